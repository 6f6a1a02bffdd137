"""The foundation every layer stands on (errors, atomic files, progress, plain numbers, the machine's load) and the
settings (typed config, the device, the peak FLOP/s MFU divides by). Imports nothing else of lmlab."""
