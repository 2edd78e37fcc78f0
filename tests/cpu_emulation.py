"""Train a tiny run and pretrain a tiny source in this process; print what they produced as
one JSON line (sha256 of the weights and of the scores, the AUCs). tests/test_numerics.py
starts it in fresh processes under the kernel choices of other CPUs. One epoch each: its
optimizer steps through every layer already give other bits on other kernels when unpinned
(the test asserts it), and the run kept its first epoch's weights when it trained two.

    python tests/cpu_emulation.py MANIFEST RUNS_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys

import sm_utils  # noqa: F401  (first: sm_utils.numerics pins the kernels unless SM_NUMERICS=native)


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(manifest: str, runs_dir: str) -> None:
    import numpy as np
    import torch

    from sm_utils.evaluation import binary_auc
    from sm_utils.pretraining import PretrainConfig, build_phantom_pretraining_set, pretrain
    from sm_utils.runs import RunConfig, train_run

    config = RunConfig(manifest=manifest, confounder="tag", p=0.5, source="imagenet_lite0",
                       image_size=32, epochs=1, batch_size=16, patience=1, augment=True,
                       device="cpu", runs_dir=runs_dir)
    from sm_utils import numerics

    out = {"aten": torch.backends.cpu.get_cpu_capability(), "profile": numerics.describe()["profile"]}
    with train_run(config, progress=False, threads=1) as run:
        out["run_weights"] = weights_sha256(run.model)
        scores = hashlib.sha256()
        for name in run.test_sets:
            probs, labels = run.predict(name)
            scores.update(np.ascontiguousarray(probs).tobytes())
            out[f"auc_{name}"] = binary_auc(labels, probs[:, 1])
        out["run_scores"] = scores.hexdigest()
    pretrain_config = PretrainConfig(image_size=32, n_per_class=8, epochs=1, batch_size=16,
                                     init="imagenet_lite0", seed=5)
    images, labels, classes = build_phantom_pretraining_set(8, image_size=32, seed=5)
    torch.set_num_threads(1)
    result = pretrain(images, labels, classes, pretrain_config, device="cpu", progress=False)
    out["source_weights"] = weights_sha256(result.model)
    out["source_val_loss"] = float(result.history["val_loss"].iloc[-1])
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
