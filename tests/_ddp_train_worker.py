"""Run by tests/test_train_loop.py under torchrun: train, then save this rank's weights."""
import os
import sys
from pathlib import Path

import torch

from convspec.train.config import TrainConfig
from convspec.train.loop import train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    cfg = TrainConfig(data="synthetic", model="convnet-8", method="svb+bbn", epochs=1,
                      batch_size=32, n_train=128, n_test=64, svb_every=2, seed=5, lr=0.05)
    result = train(cfg, out / "run", progress=False)
    rank = int(os.environ["RANK"])
    torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
