"""Start a training run: builds and runs the `deepspeed` command for the ranks of this machine."""
