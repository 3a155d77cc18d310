import torch

# the caching tests run many tiny pipelines; one thread avoids oversubscription on the shared 2-core machines
torch.set_num_threads(1)
