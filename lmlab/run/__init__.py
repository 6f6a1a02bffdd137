"""The run folder, the contract between the code that writes runs and the code that reads them: its files
(rundir), checkpoints, prompt formats and chat templates."""
