"""The tiny model and data of ``configs/cpu_tiny_grpo.yaml``: what MindSpeed-RL's GRPO flow reads, made locally.

- ``model/``: a byte-level tokenizer (ids 256.. special; ``<|endoftext|>`` pad, ``<|im_end|>`` eos) and a tiny
  Qwen3-MoE (2 layers, 8 experts, top-2, fp32, random weights, seed 0) saved by transformers. vLLM reads its config
  and tokenizer; the weights it serves come from the Megatron actor through MindSpeed-RL's weight sync.
- ``runtime_env.yaml``: the Ray workers' environment (a copy of ``configs/envs/cpu_runtime_env.yaml``), at an absolute
  path, which MindSpeed-RL's own ``cli/train_grpo.py`` (it joins ``rl_config.runtime_env_path`` to its checkout) and
  the package's entry both read.
- ``data/gsm8k_packed_*_document.{bin,idx}``: GSM8K-format rows (``../shared/data/gsm8k`` when given, otherwise
  :func:`mindspeed_rl_r3.data.synthetic_gsm8k`) converted by the package and tokenized by MindSpeed-RL's own
  preprocessing (``cli/preprocess_data.py``'s steps, ``R1AlpacaStyleInstructionHandler``).

``python -m mindspeed_rl_r3.patches.cpu_tiny_assets DIR [--gsm8k FILE] [--rows N]`` builds them; the CPU backend must
be installed and the upstream sources importable for the data step (it imports MindSpeed-RL).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from mindspeed_rl_r3 import pins
from mindspeed_rl_r3.patches.targets import PatchTarget

# MindSpeed-RL's own data pipeline, which the data step runs (doctor checks they exist).
TARGETS = tuple(
    PatchTarget(path, (pins.MINDSPEED_RL,))
    for path in (
        "mindspeed_rl.config_cls.data_handler_config.DataHandlerConfig",
        "mindspeed_rl.datasets.data_handler.build_dataset",
        "mindspeed_rl.datasets.data_handler.get_dataset_handler",
        "mindspeed_rl.datasets.preprocess_data.build_splitter",
        "mindspeed_rl.utils.tokenizer.get_tokenizer",
    )
)
VOCAB = 320
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DATA_PREFIX = "gsm8k"
# The Megatron side of the same model lives in configs/cpu_tiny_grpo.yaml (model: qwen3_tiny).
MODEL = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 1024, "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "decoder_sparse_step": 1, "mlp_only_layers": [],
}  # fmt: skip


def save_tokenizer(path: Path) -> None:
    """Byte-level BPE without merges: every text round-trips, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {s: 256 + i for i, s in enumerate(SPECIALS)}
    vocab |= {f"<extra_{i}>": i for i in range(len(vocab), VOCAB)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[2], pad_token=SPECIALS[0]).save_pretrained(path)


def save_model(path: Path) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**MODEL, eos_token_id=256 + 2, pad_token_id=256, bos_token_id=None)
    Qwen3MoeForCausalLM(config).save_pretrained(path, safe_serialization=True)


def write_rows(path: Path, gsm8k: str | None, rows: int) -> None:
    """MindSpeed-RL's preprocess input (``{"problem", "answer"}`` per line) from GSM8K or synthetic problems."""
    from mindspeed_rl_r3.data import convert_gsm8k, write_synthetic_gsm8k

    source = Path(gsm8k) if gsm8k else path.with_name("synthetic_gsm8k.jsonl")
    if not gsm8k:
        write_synthetic_gsm8k(source, rows)
    convert_gsm8k(source, path, limit=rows)


def preprocess(rows: Path, tokenizer: Path, output_prefix: Path) -> None:
    """``cli/preprocess_data.py::preprocess`` for one file, with ``configs/datasets/gsm8k_qwen3.yaml``'s handler."""
    from mindspeed_rl.config_cls.data_handler_config import DataHandlerConfig
    from mindspeed_rl.datasets.data_handler import build_dataset, get_dataset_handler
    from mindspeed_rl.datasets.preprocess_data import build_splitter
    from mindspeed_rl.utils.tokenizer import get_tokenizer

    args = DataHandlerConfig({
        "input": str(rows), "tokenizer_name_or_path": str(tokenizer), "output_prefix": str(output_prefix),
        "handler_name": "R1AlpacaStyleInstructionHandler", "tokenizer_type": "HuggingFaceTokenizer",
        "prompt_type": "qwen_math_r1", "map_keys": {"prompt": "problem", "query": "", "response": "answer",
        "system": ""}, "dataset_additional_keys": ["labels"], "workers": 1, "log_interval": 1000,
    })  # fmt: skip
    tok = get_tokenizer(args.tokenizer_name_or_path, prompt_type=args.prompt_type)
    handler = get_dataset_handler(args, build_dataset(args), tok, build_splitter(args))
    handler.serialize_to_disk()


def prepare(directory: str | os.PathLike, gsm8k: str | None = None, rows: int = 64) -> dict[str, str]:
    """Build (once) the model folder, the runtime env and the tokenized data under ``directory``; returns their paths
    ``{"model", "runtime_env", "data_path"}`` (``data_path`` is the prefix ``megatron_training.data_path`` takes)."""
    from mindspeed_rl_r3.shipped_configs import shipped_configs_dir

    root = Path(directory).resolve()
    model, data = root / "model", root / "data"
    runtime_env = root / "runtime_env.yaml"
    root.mkdir(parents=True, exist_ok=True)
    runtime_env.write_bytes((shipped_configs_dir() / "envs" / "cpu_runtime_env.yaml").read_bytes())
    if not (model / "config.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        save_tokenizer(model)
        save_model(model)
    prefix = data / DATA_PREFIX
    if not Path(f"{prefix}_packed_input_ids_document.idx").is_file():
        data.mkdir(parents=True, exist_ok=True)
        jsonl = data / "train.jsonl"
        if not jsonl.is_file():
            write_rows(jsonl, gsm8k, rows)
        preprocess(jsonl, model, prefix)
    return {"model": str(model), "runtime_env": str(runtime_env), "data_path": f"{prefix}"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mindspeed_rl_r3.patches.cpu_tiny_assets", description=__doc__)
    parser.add_argument("directory")
    parser.add_argument("--gsm8k", help="GSM8K jsonl / parquet (default: synthetic GSM8K-format problems)")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    from mindspeed_rl_r3.patches import cpu_backend

    cpu_backend.install()
    cpu_backend.use_upstream(cpu_backend.upstream_root() or "")
    print(json.dumps(prepare(args.directory, args.gsm8k, args.rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
