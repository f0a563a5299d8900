"""Per-device memory of Llama-2-7B SLayer (configs/slayer_llama2_7b.py) against full fine-tuning
of the same 38-layer model, from `slayer plan`'s accounting (shapes only, no weights).

    python bench/memory_table.py > docs/scale_table.md
"""

from pathlib import Path

from slayer_jax.training.aot import plan_memory
from slayer_jax.training.configs import load_config_file

REPO = Path(__file__).resolve().parents[1]
TARGETS = [  # device, mesh, grad_accum giving 4 rows x 4096 tokens per device per microbatch (1 on the H100)
    ("v5p-8", "data=1,fsdp=4,tensor=1", 64),
    ("v5e-8", "data=1,fsdp=8,tensor=1", 32),
    ("h100-80gb", "data=1,fsdp=1,tensor=1", 1024),
]


def main() -> None:
    gib = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    print("| device | mesh | run | trainable | params | optimizer | gradients | activations (est.) | total | HBM | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for device, mesh, accum in TARGETS:
        for label, extra in (("SLayer (9 blocks)", []), ("full fine-tuning", ["--config.full_finetune=True",
                                                                            "--config.frozen_dtype="])):
            c = load_config_file(REPO / "configs" / "slayer_llama2_7b.py", [f"--config.grad_accum={accum}", *extra])
            r = plan_memory(c, mesh, device)
            b = r["bytes"]
            print(f"| {device} | {mesh} | {label} | {r['params_trainable'] / 1e9:.2f}B | {gib(b['params'])} | "
                  f"{gib(b['optimizer'])} | {gib(b['gradients'])} | {gib(b['activations_estimate'])} | "
                  f"{gib(b['total'])} | {gib(r['hbm_per_device'])} | {'yes' if r['fits'] else 'no'} |")


if __name__ == "__main__":
    main()
