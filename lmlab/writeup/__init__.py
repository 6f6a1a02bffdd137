"""A run written up: the blocks of a document, findings in prose, prompt grids, the report."""
