"""Test-wide settings."""

import torch

# The models under test are tiny: one thread is much faster than contending for
# two cores, and it makes CPU results independent of the machine's core count.
torch.set_num_threads(1)
