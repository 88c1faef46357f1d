"""The process of tests/test_trtllm_worker.py: `python trtllm_worker_check.py <out> [stand_in | real]`.

One trainer rank (megatron-core on gloo, a tiny Llama) drives generation/trtllm_worker.py's actor
and its client, generation/rollout_worker.RolloutWorker, on a local Ray of 4 logical GPUs: 2
engines of 2 workers each, the TensorRT-LLM of tests/stand_ins (transformers Llamas as the engines'
models), the refit group on gloo instead of NCCL. Per version (0: the initial weights, 1: after an
in-place change of every parameter), the actor is refitted and generates greedily; our torch sampler
generates the same prompts on the trainer's module. Saves both to <out>/results.pt.

`real` (the `gpu` test; written, not run: no GPU or TensorRT-LLM here): TensorRT-LLM 1.2 itself and
NCCL, on a machine with >= 5 GPUs: the engines on GPUs 0-3 (Ray's GPU ids when it is started with
num_gpus=4 and no CUDA_VISIBLE_DEVICES), the trainer on the last GPU, a model TensorRT-LLM's
attention kernels take (head size 64).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from refit_broadcast_worker import BUCKET_BYTES, VOCAB, model_config  # noqa: E402

ENGINES, GPUS_PER_ENGINE = 2, 2
PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 8], [30], [7, 7, 12, 90]]  # 4 prompts: 2 per engine
EOS, PAD = 1, 0


def real_model_config():
    from nemo_rlsr.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=512, max_sequence_length=32, vocab_size=VOCAB)


@torch.no_grad()
def main(out: Path, mode: str) -> None:
    import ray

    from nemo_rlsr.distributed.dims import ParallelDims
    from nemo_rlsr.distributed.parallel import free_port, init_distributed
    from nemo_rlsr.generation.factory import write_model_dir
    from nemo_rlsr.generation.interface import SamplingParams
    from nemo_rlsr.generation.rollout_worker import RolloutWorker, named_hf_tensors
    from nemo_rlsr.generation.torch_sampler import TorchRolloutEngine
    from nemo_rlsr.generation.trtllm import TRTLLMOptions
    from nemo_rlsr.generation.trtllm_refit_ext import EXTENSION_QUALNAME
    from nemo_rlsr.generation.trtllm_worker import WORKER_ENV, _TRTLLMWorker
    from nemo_rlsr.models.gpt import build_gpt
    from nemo_rlsr.models.hf import adapter_for_model
    from nemo_rlsr.weight_sync.refit_sender import RefitSender

    real = mode == "real"
    engine_gpus = ENGINES * GPUS_PER_ENGINE
    trainer_gpu = engine_gpus if real else 0  # init_distributed takes LOCAL_RANK's GPU
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(trainer_gpu), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    cfg = real_model_config() if real else model_config()
    ctx = init_distributed(ParallelDims(seed=1))
    model = build_gpt(cfg, VOCAB, ctx).eval()
    norms = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.copy_(torch.rand(param.shape, generator=norms) + 0.5)
    adapter = adapter_for_model(cfg)
    tokenizer = types.SimpleNamespace(vocab_size=VOCAB, pad_id=PAD, eos_id=EOS)
    rl_cfg = types.SimpleNamespace(model=cfg)  # what write_model_dir reads
    model_dir = write_model_dir(rl_cfg, adapter, tokenizer, out)
    env = dict(WORKER_ENV)
    if not real:
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "stand_ins"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=2, num_gpus=engine_gpus, include_dashboard=False,
             configure_logging=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env})
    opts = TRTLLMOptions(str(model_dir), GPUS_PER_ENGINE, max_batch_size=8, max_seq_len=cfg.max_sequence_length,
                         worker_extension=EXTENSION_QUALNAME, sleep=False)
    backend = "nccl" if real else "gloo"
    actor = ray.remote(_TRTLLMWorker).options(num_cpus=0, num_gpus=0).remote(opts, ENGINES, EOS, PAD, 600, backend)
    sender = RefitSender(named_hf_tensors(adapter, cfg, VOCAB), "127.0.0.1", 1 + engine_gpus, backend, BUCKET_BYTES,
                         600)
    worker = RolloutWorker(actor, sender, started_ray=True)
    params = SamplingParams(6, greedy=True, n=2)
    seeds = list(range(len(PROMPTS)))
    ours = TorchRolloutEngine(model, PAD, EOS, VOCAB)
    results = {}
    for version in (0, 1):
        if version == 1:
            for param in model.parameters():
                param.mul_(1.3).add_(0.02)
        metrics = worker.refit(model, version)
        generated = worker.result(worker.submit(PROMPTS, params, seeds))
        want = ours.generate(PROMPTS, params, seeds)
        results[version] = {"metrics": metrics, "version": generated.version, "engine": generated.batch,
                            "ours": want}
    worker.close()
    torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "stand_in")
