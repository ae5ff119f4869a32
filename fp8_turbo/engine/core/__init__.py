"""The engine loop: requests and sequences, the scheduler, the paged KV-cache manager, the model
runner and the sync/async engines. Imports checkpoints/, model/, sampling/, kernels/ and tokenizer/;
never serving/ or lab/."""
