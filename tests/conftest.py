import os

import torch

# Under pytest-xdist each worker gets one intra-op thread: two workers on two cores, instead of four threads
# fighting over them (which made some training tests 30x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
