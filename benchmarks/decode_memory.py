"""Peak memory of starting to decode a short prompt and a long one (the prefill, then one step), on the CPU, in a
fresh process each: what a prompt nobody scores costs beyond its KV cache (its logits, when the head ran over it).

    python benchmarks/decode_memory.py [--tree PATH ...] [--long 3847]

The model: 2 layers, 128 wide, a 4,096-token context and a 32,000-token vocabulary (a long context and a large
vocabulary are where the prompt's logits outweigh everything else). `--tree` measures other source trees beside this
one (e.g. main before a change).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURE = """
import resource, sys, torch
from lmlab.core.config import ModelConfig, SamplingParams
from lmlab.inference.decode import Decoder, Sequence
from lmlab.model import build_model
torch.manual_seed(0)
model = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=4096, vocab_size=32000)).eval()
decoder = Decoder(model, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    decoder.join(Sequence(list(range(1, int(sys.argv[1]) + 1)), SamplingParams(max_new_tokens=2, temperature=0)))
    decoder.step()
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak(tree: Path, tokens: int) -> tuple[float, float]:
    """MiB of peak RSS before the prompt and after its prefill and a step, in a fresh process on one thread."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tokens)], env=env, cwd=tree, capture_output=True,
                          text=True, check=True)  # run in the tree: `-c` puts the working folder first on sys.path
    before, after = map(int, done.stdout.split())
    return before / 1024, after / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another source tree to measure")
    parser.add_argument("--long", type=int, default=3847, help="the long prompt's tokens (at most 4,095)")
    args = parser.parse_args()
    print(f"{'tree':<40} {'prompt':>7} {'peak MiB':>9} {'over the model':>15}")
    for tree in [ROOT, *args.tree]:
        for tokens in (20, args.long):
            before, after = peak(tree.resolve(), tokens)
            print(f"{str(tree)[-40:]:<40} {tokens:>7,} {after:>9,.0f} {after - before:>15,.0f}")


if __name__ == "__main__":
    main()
