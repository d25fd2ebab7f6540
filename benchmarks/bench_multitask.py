"""Multi-task inference cost: labelling images for T tasks ÷ for one task, with MultiTaskClassifier.

One open_clip model (random weights; speed does not depend on them) and one fitted delta file
(``--classes`` classes), loaded T times under different task names: the per-task work is the
same whatever the delta holds. Two measurements, best of ``--repeats``, interleaved:

* end to end: ``MultiTaskClassifier.predict`` on ``--images`` images (image loading, one trunk
  pass, then every task's projector and classifier) — on a busy machine its noise can exceed the
  per-task cost;
* split: the trunk pass alone (``extract_features(images, views=0)``) and the T tasks' heads
  alone (``logits_from_features`` of each task on those features), which MultiTaskClassifier
  runs one after the other.

Serving the tasks with one ProLIPAdapter each would cost about T× one task, since each adapter
runs the vision tower itself.

Run: ``.venv/bin/python benchmarks/bench_multitask.py`` (about 1–2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import open_clip
import torch
from timing import timed

from prolip import ProLIPAdapter
from prolip.model.towers import find_projector
from prolip.variants.multitask import MultiTaskClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16], help="(default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10, help="classes per task (default: %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="(default: %(default)s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = open_clip.create_model(args.model)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 256, 320), dtype=torch.uint8, generator=gen) for _ in range(args.images)]
    adapter = ProLIPAdapter(model, epochs=5, device=args.device, verbose=False)
    labels = [f"class {i % args.classes}" for i in range(4 * args.classes)]
    adapter.fit_features(torch.randn(1, len(labels), find_projector(model).in_features, generator=gen), labels)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.safetensors"
        adapter.save(path)
        classifiers = {
            t: MultiTaskClassifier({f"task{i}": path for i in range(t)}, model=model, device=args.device)
            for t in args.tasks
        }
        heads = [
            ProLIPAdapter.load(path, model=model, device=args.device, verbose=False) for _ in range(max(args.tasks))
        ]

    features = adapter.extract_features(images, views=0)
    trunk, end_to_end = float("inf"), dict.fromkeys(args.tasks, float("inf"))
    for _ in range(args.repeats):
        trunk = min(trunk, timed(lambda: adapter.extract_features(images, views=0)))
        for t, clf in classifiers.items():
            end_to_end[t] = min(end_to_end[t], timed(lambda clf=clf: clf.predict(images)))
    head = {
        t: min(timed(lambda t=t: [h.logits_from_features(features) for h in heads[:t]]) for _ in range(20))
        for t in args.tasks
    }
    one = min(args.tasks)
    print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads), {args.images} images, "
          f"{args.classes} classes per task; trunk pass {trunk:.3f} s")  # fmt: skip
    print(f"{'tasks':>5} {'predict s':>9} {'÷ 1 task':>8} {'heads ms':>8} {'(trunk + heads) ÷ 1 task':>25}")
    for t in args.tasks:
        split = (trunk + head[t]) / (trunk + head[one])
        print(
            f"{t:>5} {end_to_end[t]:>9.3f} {end_to_end[t] / end_to_end[one]:>8.3f} {head[t] * 1e3:>8.1f} {split:>25.3f}"
        )


if __name__ == "__main__":
    main()
