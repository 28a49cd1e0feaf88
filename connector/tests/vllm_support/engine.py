"""A vLLM engine process driven by the tests: one JSON command per stdin line, one reply line.

Each engine runs in its own process (vLLM keeps global state), in-process engine core so the
connector's stats can be read with `pegaflow.connector.connector_stats()`.
Commands: {"generate": [[token ids], ...], "max_tokens": n} -> {"outputs": [[...]], "stats": [...]};
{"stats": true} -> {"stats": [...]}; {"exit": true}.

With `--serve-port` the process becomes vLLM's OpenAI-compatible server instead, with the same
model and engine options (tests/test_pd.py puts its prefill and decode engines behind the
router this way).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# DeepSeek-V2's attention (MLA) at its real latent size, the one vLLM's CPU MLA kernel takes:
# kv_lora_rank 512 + qk_rope_head_dim 64 per token. No MoE layer (first_k_dense_replace).
TINY_DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 64,
    "v_head_dim": 32,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 2,
    "moe_layer_freq": 1,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# Model configs by family, and the engine options each needs beyond ENGINE_OPTIONS (vLLM's CPU
# MLA kernel takes 16-token blocks only).
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama": (TINY_LLAMA, {}),
    "deepseek_v2": (TINY_DEEPSEEK_V2, {"block_size": 16}),
}
BLOCK_SIZE = 32
# Engine options of every test engine, offline (`LLM(**...)`) or served (as CLI flags).
ENGINE_OPTIONS: dict[str, Any] = {
    "load_format": "dummy",
    "skip_tokenizer_init": True,
    "block_size": BLOCK_SIZE,
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 1024,
    "max_num_seqs": 8,
    "kv_cache_memory_bytes": 32 << 20,
    "seed": 0,
}


def write_model(directory: str, family: str = "llama") -> None:
    """A config-only model: vLLM's dummy loader makes the weights (no download needed).
    Written to a temporary file and renamed, so engines starting together on one directory
    never read a half-written config."""
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f"config.json.{os.getpid()}")
    with open(partial, "w") as f:
        json.dump(FAMILIES[family][0], f)
    os.replace(partial, os.path.join(directory, "config.json"))


def cli_flags(options: dict[str, Any]) -> list[str]:
    """`LLM` keyword options as `vllm serve` flags: `block_size=32` is `--block-size 32`."""
    flags: list[str] = []
    for name, value in options.items():
        flag = name.replace("_", "-")
        if value is True:
            flags.append(f"--{flag}")
        elif value is False:
            flags.append(f"--no-{flag}")
        else:
            flags += [f"--{flag}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


def serve(model: str, port: int, options: dict[str, Any]) -> None:
    """Replaces this process with vLLM's OpenAI-compatible server on 127.0.0.1:`port`. The
    executor runs in the engine-core process (`uni`): one process fewer to start."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--distributed-executor-backend", "uni",
            *cli_flags(options)]  # fmt: skip
    os.execv(sys.executable, argv)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--socket", help="use PegaKVConnector with this node socket")
    parser.add_argument("--extra", default="{}", help="more kv_connector_extra_config, JSON")
    parser.add_argument("--serve-port", type=int, help="serve the OpenAI API on this port")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    args = parser.parse_args()
    write_model(args.model, args.family)

    options: dict[str, Any] = {**ENGINE_OPTIONS, **FAMILIES[args.family][1]}
    if args.socket:
        extra = {"socket_path": args.socket, "stats_interval_s": 1.0, **json.loads(args.extra)}
        options["kv_transfer_config"] = {
            "kv_connector": "PegaKVConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "pegaflow.connector",
            "kv_connector_extra_config": extra,
        }
        # Hits must come from PegaFlow, not from vLLM's own prefix cache.
        options["enable_prefix_caching"] = False
    if args.serve_port is not None:
        serve(args.model, args.serve_port, options)

    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, **options)
    from pegaflow.connector import connector_stats

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("exit"):
            break
        reply: dict[str, Any] = {}
        if "generate" in command:
            params = SamplingParams(
                max_tokens=command.get("max_tokens", 16), temperature=0.0, detokenize=False
            )
            prompts = [{"prompt_token_ids": ids} for ids in command["generate"]]
            results = llm.generate(prompts, params, use_tqdm=False)
            reply["outputs"] = [list(r.outputs[0].token_ids) for r in results]
        reply["stats"] = connector_stats()
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
