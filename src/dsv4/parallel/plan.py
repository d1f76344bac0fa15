"""`dsv4 plan`: per-rank memory and per-token FLOPs of a V4 model trained by a torchrun job of dsv4.

The layout is dsv4's: FSDP2 shards every parameter, gradient and optimiser state over all `world` ranks;
with expert parallelism (ep > 1) each rank runs E / ep routed experts of a layer instead of gathering
all E (FSDP2 then shards the experts over the world / ep ranks of each expert group, so their resident
share is still 1 / world). Counts come from dsv4.flops (exact parameter counts of the model built on
the meta device), and the FLOPs from the same function as the trainer's MFU.

Bytes per rank:
- parameters and gradients: fp32, total / world (the trainer keeps fp32 weights; bf16 autocast);
- optimiser state: Muon keeps one fp32 momentum per matrix element, AdamW two moments (embedding, head,
  norms, biases, sinks, mHC scales), / world (dsv4.optim.groups decides which is which);
- gathered block: FSDP2 all-gathers one block in bf16 for its forward and backward and prefetches the
  next, so two blocks' non-expert weights plus their experts (all E, or E / ep with expert parallelism);
- activations: the tensors the backward keeps (fp32), per token (below) times the tokens of a micro-batch;
  with activation checkpointing only each block's input streams stay (hc x d) plus one block's
  activations while it recomputes;
- KV cache (serving, one sequence): dsv4.flops.kv_cache_bytes at the given context.

Activations per token: a linear model of the model's widths whose coefficients were fitted to the
tensors the training step really saves (activation_elements_per_token_layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.config import ConfigError, ModelConfig
from dsv4.flops import build_meta_model, flops_per_token, kv_cache_bytes, param_count

GB = 1e9


@dataclass(frozen=True)
class Layout:
    """A planned job: nodes x gpus_per_node ranks; ep ranks share each MoE layer's routed experts."""

    nodes: int = 1
    gpus_per_node: int = 8
    ep: int = 1

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self, cfg: ModelConfig) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1 or self.ep < 1:
            raise ValueError("--nodes, --gpus-per-node and --ep must be >= 1")
        if self.world % self.ep:
            raise ValueError(f"--ep {self.ep} must divide the {self.world} ranks")
        if cfg.n_routed_experts % self.ep:
            raise ValueError(f"--ep {self.ep} must divide n_routed_experts={cfg.n_routed_experts}")


def optimizer_split(cfg: ModelConfig) -> tuple[int, int]:
    """(Muon elements, AdamW elements) of the trainable parameters, as dsv4.optim.groups assigns them."""
    from dsv4.optim.groups import assign_param_groups

    model = build_meta_model(cfg)
    plan = assign_param_groups(model)
    numel = {n: p.numel() for n, p in model.named_parameters()}
    muon = sum(numel[n] for n, a in plan.items() if a.algorithm == "muon")
    return muon, sum(numel.values()) - muon


MHC_PER_STREAM_ELEMENT = 8.5  # saved elements per mHC stream element (hc x d) of a block (maps, mixes, norms)
MHC_PER_TOKEN = 2000  # the block's constant part: the Sinkhorn iterations' hc x hc maps and the like
ATTN_PER_WIDTH = 1.5  # per element of the attention widths (q_lora, q, kv, output, o_lora, indexer queries)
ROUTED_PER_WIDTH = 4.5  # per (d + moe_intermediate_size) of each routed expert a token visits
SHARED_PER_WIDTH = 3.5  # the same for each shared expert
HEAD_PER_VOCAB = 1.0  # per vocabulary entry per token and head (the fused head + cross entropy)


def activation_elements_per_token_layer(cfg: ModelConfig) -> float:
    """Elements the backward keeps per token and layer: coefficients fitted to the tensors dsv4's training
    step saves (counted with torch.autograd.graph.saved_tensors_hooks on the micro, tiny and wide presets at
    256 tokens: within 12%; tests/test_plan.py checks micro and tiny at 512 tokens to 15%)."""
    d, hc, inner = cfg.hidden_size, cfg.hc_mult, cfg.moe_intermediate_size
    attn = cfg.q_lora_rank + 2 * cfg.num_attention_heads * cfg.head_dim + cfg.head_dim
    attn += cfg.o_groups * cfg.o_lora_rank + cfg.index_n_heads * cfg.index_head_dim
    return (
        MHC_PER_STREAM_ELEMENT * hc * d
        + MHC_PER_TOKEN
        + ATTN_PER_WIDTH * attn
        + ROUTED_PER_WIDTH * cfg.num_experts_per_tok * (d + inner)
        + SHARED_PER_WIDTH * cfg.n_shared_experts * (d + inner)
    )


def activation_elements_per_token(cfg: ModelConfig) -> float:
    """Per token over the whole model: every block (MTP included) and each head's cross entropy."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    heads = 1 + cfg.num_nextn_predict_layers
    return layers * activation_elements_per_token_layer(cfg) + heads * HEAD_PER_VOCAB * cfg.vocab_size


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs of one decode token at position `context` - 1: flops_per_token averages over the
    positions of a sequence, so the last position's share is L f(L) - (L - 1) f(L - 1)."""
    f = lambda n: flops_per_token(cfg, n, training=False, include_mtp=False)
    return context * f(context) - (context - 1) * f(context - 1) if context > 1 else f(1)


def plan(
    cfg: ModelConfig,
    layout: Layout,
    seq_len: int = 4096,
    micro_batch: int = 1,
    context: int = 1 << 20,
) -> dict:
    """The numbers `dsv4 plan` prints (bytes per rank; FLOPs per token)."""
    if cfg.is_v32:  # the activation model is fitted to V4's blocks (mHC streams, grouped output)
        raise ConfigError("dsv4 plan models the V4 family; its activation model has no V3.2 (MLA) blocks yet")
    layout.check(cfg)
    world = layout.world
    pc = param_count(cfg)
    total = pc.total_with_mtp
    muon, adamw = optimizer_split(cfg)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    routed = pc.components.get("routed_experts", 0) + pc.mtp_components.get("routed_experts", 0)
    dense_per_block = (total - routed - pc.components["embedding"] - pc.components.get("head", 0)) / layers
    experts_per_block = routed / layers / layout.ep
    gathered = 2 * 2 * (dense_per_block + experts_per_block)  # bf16, this block and the prefetched one
    tokens = seq_len * micro_batch
    act_full = 4 * activation_elements_per_token(cfg) * tokens  # fp32: what the training step keeps
    act_ckpt = (
        4 * tokens * (layers * cfg.hc_mult * cfg.hidden_size + activation_elements_per_token_layer(cfg))
    )  # each block's input streams, and one block recomputing
    kv = kv_cache_bytes(cfg)
    out = {
        "world": world,
        "ep": layout.ep,
        "params_total": pc.total,
        "params_with_mtp": total,
        "params_active": pc.active,
        "bytes": {
            "parameters": 4 * total / world,
            "gradients": 4 * total / world,
            "optimizer": (4 * muon + 8 * adamw) / world,
            "gathered_blocks": gathered,
            "activations": act_full,
            "activations_checkpointed": act_ckpt,
            "kv_cache_one_sequence": kv["per_token"] * context + kv["fixed"],
        },
        "flops_per_token": {
            "training": flops_per_token(cfg, seq_len),
            "decode": decode_flops_per_token(cfg, context),
        },
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "context": context,
    }
    b = out["bytes"]
    b["total"] = b["parameters"] + b["gradients"] + b["optimizer"] + b["gathered_blocks"] + b["activations"]
    b["total_checkpointed"] = b["total"] - b["activations"] + b["activations_checkpointed"]
    return out


def format_plan(name: str, p: dict) -> str:
    """The table `dsv4 plan` prints."""
    b, f = p["bytes"], p["flops_per_token"]
    rows = [
        ("parameters (fp32, sharded)", b["parameters"]),
        ("gradients (fp32, sharded)", b["gradients"]),
        ("optimiser state (Muon 1x, AdamW 2x fp32)", b["optimizer"]),
        ("gathered blocks (bf16, 2 blocks)", b["gathered_blocks"]),
        (f"activations, fp32 ({p['micro_batch']} x {p['seq_len']} tokens)", b["activations"]),
        ("  with activation checkpointing", b["activations_checkpointed"]),
        ("total per rank", b["total"]),
        ("  with activation checkpointing", b["total_checkpointed"]),
        (f"KV cache, one sequence of {p['context']:,} tokens", b["kv_cache_one_sequence"]),
    ]
    lines = [
        f"{name}: {p['params_total'] / 1e9:.2f}B parameters, {p['params_active'] / 1e9:.2f}B active "
        f"({p['params_with_mtp'] / 1e9:.2f}B with the MTP block); {p['world']} ranks, ep {p['ep']}",
        *(f"  {label:<46} {v / GB:>10.2f} GB" for label, v in rows),
        f"  {'training FLOPs per token':<46} {f['training'] / 1e9:>10.2f} GFLOP",
        f"  {'decode FLOPs per token at the context':<46} {f['decode'] / 1e9:>10.2f} GFLOP",
    ]
    return "\n".join(lines)
