"""Suite-wide settings: tiny models run fastest on one thread, and threads oversubscribed by
Ray workers or a busy machine slow torch down by orders of magnitude."""

import torch

torch.set_num_threads(1)
