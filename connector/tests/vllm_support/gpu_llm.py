"""A real vLLM engine on the GPU, driven by tests/test_vllm_gpu.py: one JSON command per stdin
line, one reply line on stdout (vLLM's own log lines never start with `{`).

The model is a config-only Llama from scenarios/gpu/vllm/ whose dummy weights are replaced by
seeded ones of a trained model's scale (`realistic_weights`). The engine core runs
in this process, so `pegaflow.connector.connector_stats()` sees both connector halves.
Commands: {"generate": [[token ids], ...], "max_tokens": n} -> {"outputs": [{"tokens": [...],
"logprobs": [[[token, logprob], ...] per position]}], "stats": [...]}; {"exit": true}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_USE_FLASHINFER_SAMPLER"] = "0"  # the host has no flashinfer

TOP_LOGPROBS = 5


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {
        "load_format": "dummy",
        "skip_tokenizer_init": True,
        "dtype": "bfloat16",
        "block_size": args.block_size,
        "enforce_eager": True,
        "max_model_len": args.max_model_len,
        "max_num_seqs": 8,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_memory_bytes": args.kv_cache_bytes,
        "enable_prefix_caching": False,  # every hit must come from the store under test
        "seed": 0,
        "max_logprobs": TOP_LOGPROBS,
    }
    if args.socket:
        extra = {"socket_path": args.socket, "stats_interval_s": 1.0, **json.loads(args.extra)}
        options["kv_transfer_config"] = {
            "kv_connector": "PegaKVConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "pegaflow.connector",
            "kv_connector_extra_config": extra,
        }
    return options


def realistic_weights(model: Any) -> None:
    """Replaces vLLM's dummy weights (uniform in +-1e-3, so small that the residual stream is
    the last token's embedding and attention barely moves the logits) with weights of a
    trained model's scale, seeded by parameter name so every engine gets the same model: the
    outputs then depend on every cached token, and a wrong KV byte shows in the logprobs."""
    import torch

    for name, param in model.named_parameters():
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        generator = torch.Generator(device=param.device).manual_seed(seed)
        if param.dim() == 1:  # RMSNorm scales
            param.data.fill_(1.0)
            continue
        std = 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5
        values = torch.randn(param.shape, generator=generator, device=param.device)
        param.data.copy_(values * std)


def output_of(result: Any) -> dict[str, Any]:
    completion = result.outputs[0]
    logprobs = [
        sorted(([token, entry.logprob] for token, entry in position.items()), key=lambda x: x[0])
        for position in completion.logprobs
    ]
    return {"tokens": list(completion.token_ids), "logprobs": logprobs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="a model config.json")
    parser.add_argument("--model-dir", required=True, help="where the config is copied")
    parser.add_argument("--socket", help="use PegaKVConnector with this node socket")
    parser.add_argument("--extra", default="{}", help="more kv_connector_extra_config, JSON")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    parser.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    logging.getLogger("pegaflow").setLevel(logging.INFO)  # the connector's registration line
    os.makedirs(args.model_dir, exist_ok=True)
    partial = os.path.join(args.model_dir, f"config.json.{os.getpid()}")
    shutil.copyfile(args.config, partial)  # engines starting together share the directory
    os.replace(partial, os.path.join(args.model_dir, "config.json"))

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model_dir, **engine_options(args))
    llm.apply_model(realistic_weights)
    from pegaflow.connector import connector_stats

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("exit"):
            break
        reply: dict[str, Any] = {}
        if "generate" in command:
            params = SamplingParams(
                max_tokens=command.get("max_tokens", 8),
                temperature=0.0,
                ignore_eos=True,
                logprobs=TOP_LOGPROBS,
                detokenize=False,
            )
            prompts = [{"prompt_token_ids": ids} for ids in command["generate"]]
            results = llm.generate(prompts, params, use_tqdm=False)
            reply["outputs"] = [output_of(result) for result in results]
        reply["stats"] = connector_stats()
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
