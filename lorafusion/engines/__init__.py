"""Pipeline-parallel execution of the multi-job runtime: the stage splitter and the engines
(megatron-core and DeepSpeed), launched with torchrun."""
