"""The training loop: raw text -> tokenizer -> packed batches -> a trained V4-style model.

Per step (docs/spec.md sections 2, 3, 5, 8): loss = LM + mtp_loss_weight * MTP + MoE balance loss + indexer KL;
Muon + AdamW with warmup/cosine and gradient clipping; after each optimiser step the MoE balancing
biases move toward uniform load. The lightning indexers train in two stages: a dense warm-up in which
only the indexers learn (KL to the dense attention), then sparse training with top-k attention, the
indexer's input detached and its KL restricted to the selected entries. A non-finite loss skips the
step; `max_bad_steps` in a row stop the run with an error. Checkpoints are atomic and a resumed run
continues exactly (the batch of a step is a pure function of the seed and the step).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv4.config import ConfigError, ModelConfig
from dsv4.data import (
    Batches,
    DataError,
    find_files,
    ids_to_bytes,
    iter_documents,
    load_tokenizer,
    split_files,
    text_files,
    token_byte_lengths,
    tokenize_files_cached,
    train_tokenizer,
    val_batches,
)
from dsv4.device import resolve_device
from dsv4.eval.bpb import bits_per_byte, xz_bits_per_byte
from dsv4.eval.recall import indexer_recall
from dsv4.eval.text_bpb import score_batches
from dsv4.flops import flops_per_token, measure_matmul_peak
from dsv4.kernels import compiled
from dsv4.kernels.loss import linear_cross_entropy
from dsv4.model import build_model
from dsv4.model.mhc import composite_gain
from dsv4.model.moe import MoE
from dsv4.model.transformer import ModelOutput, Transformer
from dsv4.optim.groups import build_optimizer
from dsv4.optim.schedule import clip_grad_norm, lr_at, set_lr
from dsv4.parallel import dist as pdist
from dsv4.run import RunDir
from dsv4.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dsv4.train.config import TrainConfig, apply_overrides


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite losses)."""


def pick_dtype(choice: str, device: torch.device | str = "cpu") -> torch.dtype:
    """fp32, bf16, or for 'auto': on a CUDA device bf16 when it supports it (autocast, fp32 weights), on the
    CPU whichever matmul is faster on this machine (bf16 needs AMX to win)."""
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_bf16_faster() else torch.float32


@functools.cache
def _cpu_bf16_faster() -> bool:
    """Whether a bf16 matmul beats fp32 by 20% on this CPU (native bf16 units: AVX512-BF16 or AMX).
    Measured once per process, so every 'auto' choice of a run agrees."""
    f32 = measure_matmul_peak(torch.float32, n=512, seconds=0.2)
    b16 = measure_matmul_peak(torch.bfloat16, n=512, seconds=0.2)
    return b16 > 1.2 * f32


INDEXER_WARMUP = 30  # default indexer warm-up steps (the DSA report's stage 1), at most WARMUP_FRACTION of a run
LR_WARMUP = 20  # default LR warm-up steps of the LM stage, at most WARMUP_FRACTION of that stage
WARMUP_FRACTION = 0.1
MIN_LM_STEPS = 50  # fewer language-model steps than this barely move the loss off the random model's


def stage_plan(total: int, tc: TrainConfig, has_indexer: bool) -> tuple[int, int]:
    """(indexer warm-up steps, LR warm-up steps) of a run of `total` steps. A length the config leaves at
    None scales with the run: min(default, 10% of the steps it precedes), so a short run still spends
    ~90% of its steps training the language model at its full learning rate."""
    if not has_indexer:
        warm = 0
    elif tc.indexer_warmup_steps is None:
        warm = min(INDEXER_WARMUP, int(total * WARMUP_FRACTION))
    else:
        warm = min(tc.indexer_warmup_steps, total)
    lm = total - warm
    lr_warm = max(1, min(LR_WARMUP, int(lm * WARMUP_FRACTION))) if tc.warmup_steps is None else max(1, tc.warmup_steps)
    return warm, lr_warm


def lm_losses(
    out: ModelOutput, targets: torch.Tensor, head_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token CE (nats/token) and MTP CE (depth k at position i predicts targets[i + k]).

    From out.logits, or (when the model ran with compute_logits=False) from out.h with the fused
    head + CE of dsv4.kernels.loss and the given head weight."""

    def ce(logits: torch.Tensor | None, h: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        if logits is not None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1))
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), head_weight, tgt.reshape(-1))

    lm = ce(out.logits, out.h, targets)
    depths = out.mtp_logits or out.mtp_h
    mtp = None
    if depths:
        terms = [ce(x if out.mtp_logits else None, x, targets[:, k:]) for k, x in enumerate(depths, start=1)]
        mtp = torch.stack(terms).mean()
    return lm, mtp


def step_loss(
    model: Transformer,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    warmup: bool = False,
    mtp_weight: float = 0.3,
    engram_prefetched: dict | None = None,
    job_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss one training step minimises, and its parts (0-dim tensors, for the log).

    Indexer warm-up (stage 1): the indexers' KL to dense attention alone. Otherwise (stage 2):
    LM + mtp_weight * MTP + MoE balance loss + the indexers' KL on their selected entries, with the LM
    and MTP heads fused with their cross entropy (out.h / out.mtp_h, dsv4.kernels.loss).
    job_mean (data parallel): the mean of a tensor over the job's ranks. Each indexer KL is a mean over
    the queries that have allowed entries, whose number differs between ranks; rescaled by
    n_rank / mean_rank(n), the ranks' averaged gradients are those of the mean over all the job's queries."""
    mode = "dense" if warmup else ("sparse" if model.cfg.has_indexer else None)
    out = model(
        input_ids,
        return_mtp=not warmup,
        segment_ids=segment_ids,
        indexer_mode=mode,
        compute_logits=False,
        engram_prefetched=engram_prefetched,
    )
    indexer_loss = out.indexer_loss
    if indexer_loss is not None and job_mean is not None:
        n = torch.stack([ix.queries for ix in out.indexers]).float()
        weight = n / job_mean(n.clone()).clamp_min(1e-30)
        indexer_loss = (torch.stack([ix.loss for ix in out.indexers]) * weight.to(indexer_loss.device)).sum()
    parts = {}
    if warmup:
        loss = indexer_loss
    else:
        lm, mtp = lm_losses(out, targets, model.head.weight)
        loss = parts["lm_loss"] = lm
        if mtp is not None:
            loss = loss + mtp_weight * mtp
            parts["mtp_loss"] = mtp
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            parts["aux_loss"] = out.aux_loss
    if indexer_loss is not None:
        if not warmup:
            loss = loss + indexer_loss
        parts["indexer_loss"] = indexer_loss
    return loss, parts


@dataclass
class RunData:
    batches: Batches
    val_stream: object
    token_bytes: object
    tokenizer: object


@dataclass
class Trainer:
    """One training run: built by create() (fresh or resumed), run by fit(). Every attribute is declared
    here; build() fills the ones after `data`."""

    tc: TrainConfig
    mc: ModelConfig
    run: Path
    data: RunData
    model: Transformer = None
    optimizer: object = None
    device: torch.device = None  # resolved from tc.device by build()
    dtype: torch.dtype = torch.float32  # autocast dtype (fp32 = none)
    engram: object = None  # dsv4.train.engram.EngramTraining of an Engram model
    has_indexer: bool = False
    state: dict = field(default_factory=dict)  # step, total_steps, counters: saved in every checkpoint
    warm: int = 0  # indexer warm-up steps (stage_plan)
    lr_warm: int = 1  # LR warm-up steps of the LM stage (stage_plan)
    peak: float = 1.0  # measured matmul peak, FLOP/s (MFU's denominator)
    flops_tok: float = 0.0  # FLOPs per token of an LM-stage step
    flops_warm: float = 0.0  # FLOPs per token of an indexer warm-up step
    moes: list = field(default_factory=list)  # the MoE layers (balancing-bias updates, load stats)
    dist: pdist.DistEnv = pdist.SINGLE  # this process's place in a torchrun job
    root: object = None  # torchrun jobs: the FSDP2 root (dsv4.parallel.fsdp.Root) that runs the model
    _in_update: bool = False  # inside optimizer.step: Ctrl-C is held until the step ends
    _pending_interrupt: bool = False

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(cls, tc: TrainConfig, overrides: list[str] = (), resume: bool = False) -> Trainer:
        run = Path(tc.out)
        if resume:
            if not RunDir(run).is_run():
                raise ConfigError(f"--resume: {run} has no train_config.json (not a dsv4 run directory)")
            saved = TrainConfig.from_json(RunDir(run).train_config)
            saved.progress = tc.progress
            if tc.device:  # a run may continue on another device; "" keeps its own
                saved.device = tc.device
            saved.validate_device()
            world = pdist.env_from_environ().world
            if saved.ep_size not in (1, world):  # the expert layout follows the job that continues the run
                saved.ep_size = world if saved.ep_size > 1 and world > 1 else 1
            tc = saved
            mc = ModelConfig.from_json(RunDir(run).model_config)
        else:
            mc = ModelConfig.preset(tc.preset)
            tc, mc = apply_overrides(tc, mc, list(overrides))
            tc.validate()
            if latest_checkpoint(run) is not None:
                raise ConfigError(
                    f"{run} already holds checkpoints: pass --resume to continue it, or choose another --out"
                )
        if tc.threads:
            torch.set_num_threads(tc.threads)
        env = pdist.init(resolve_device(tc.device or "cpu", "device="))
        if env.active:
            check_distributed(tc, mc, env)
        elif tc.ep_size != 1:
            raise ConfigError(f"ep_size={tc.ep_size} needs a torchrun job of {tc.ep_size} ranks (--nproc {tc.ep_size})")
        created = None  # the topmost folder this start creates, removed again if the start fails
        if not run.exists():
            created = run
            while not created.parent.exists():
                created = created.parent
        run.mkdir(parents=True, exist_ok=True)
        try:
            if not env.main:  # rank 0 trains the tokenizer and tokenizes first; the others read its cache
                pdist.barrier()
            data = prepare_data(tc, mc, run, quiet=not env.main)
            if env.main:
                pdist.barrier()
            t = cls(tc, mc, run, data, dist=env)
            t.build(resume)
        except BaseException:
            if created is not None and env.main:
                shutil.rmtree(created, ignore_errors=True)
            raise
        return t

    def build(self, resume: bool) -> None:
        tc, mc = self.tc, self.mc
        if self.dist.main:
            tc.to_json(RunDir(self.run).train_config)
            mc.to_json(RunDir(self.run).model_config)
        torch.manual_seed(tc.seed)
        self.device = resolve_device(tc.device, "device=")
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.dtype = self.agreed_dtype(tc.dtype)
        self.model = build_model(mc)
        self.model.init_weights(seed=tc.seed)  # on the CPU: the same weights on every device
        self.model.to(self.device)
        if tc.fp4_qat:
            from dsv4.quant.qat import enable_fp4_qat

            enable_fp4_qat(self.model)
        ck = latest_checkpoint(self.run) if resume else None
        saved = self.build_optimizer(ck)
        self.engram = None
        if mc.engram_layer_ids and self.device.type != "cpu":
            raise ConfigError(
                f"device={tc.device}: Engram training keeps its tables and their optimiser in host "
                "memory and runs on the CPU only; use device=cpu"
            )
        if mc.engram_layer_ids:
            from dsv4.data.canonical import canonical_map, save_canonical_map
            from dsv4.train.engram import EngramTraining

            cmap = canonical_map(self.data.tokenizer, mc.vocab_size)
            if self.dist.main:
                save_canonical_map(cmap, RunDir(self.run).tokenizer)
            self.model.set_canonical_map(cmap)
            self.engram = EngramTraining(
                self.model,
                tc.engram_store,
                self.engram_dir(),
                tc.engram_prefetch,
                tc.engram_hot_rows,
                tc.engram_lr_mult,
                tc.seed,
            )
        long_run = (tc.minutes or 0) >= 2 or (tc.steps or 0) >= 200
        compiled.enable(tc.compile == "on" or (tc.compile == "auto" and long_run))
        self.has_indexer = mc.has_indexer
        self.state = {"step": 0, "total_steps": tc.steps, "bad_steps": 0, "skipped": 0, "elapsed": 0.0, "tokens": 0}
        if saved is not None:
            if self.engram is not None:
                self.engram.load(ck)
            saved.pop("rng", None)
            self.state.update(saved)
            self.say(f"resumed from {ck} at step {self.state['step']}")
        if self.dist.main:
            self._truncate_metrics(self.state["step"])  # also drops the records of a run restarted at step 0
        self.warm, self.lr_warm = 0, 1
        if self.state["total_steps"] is not None:
            self.set_plan(self.state["total_steps"])
        # best of three short runs: one unlucky slice of a shared CPU must not inflate MFU
        self.peak = max(measure_matmul_peak(self.dtype, n=1024, seconds=0.3, device=self.device) for _ in range(3))
        self.peak *= self.dist.world  # MFU of the job: its FLOP/s over the peak of all its ranks
        self.flops_tok = flops_per_token(mc, tc.seq_len)
        self.flops_warm = flops_per_token(mc, tc.seq_len, stage="warmup")  # an indexer warm-up step
        self.moes = [m for m in self.model.modules() if isinstance(m, MoE)]

    def agreed_dtype(self, choice: str) -> torch.dtype:
        """pick_dtype(choice); in a torchrun job rank 0's pick, so that every rank computes alike."""
        bf16 = pdist.broadcast_int(int(pick_dtype(choice, self.device) == torch.bfloat16))
        return torch.bfloat16 if bf16 else torch.float32

    def build_optimizer(self, ck: Path | None) -> dict | None:
        """The optimiser (after FSDP2 sharding in a torchrun job), loaded from checkpoint ck when given ->
        the checkpoint's saved state (or None). A job resumes checkpoints of any world size: a one-process
        checkpoint is loaded whole before sharding, a distributed one shard by shard after it."""
        tc = self.tc

        def make():
            ns_bf16 = self.agreed_dtype(tc.ns_dtype) == torch.bfloat16
            return build_optimizer(self.model, tc.lr, tc.weight_decay, matrices=tc.optimizer, ns_bf16=ns_bf16)

        if not self.dist.active:
            self.optimizer = make()
            return None if ck is None else load_checkpoint(ck, self.model, self.optimizer)
        from dsv4.parallel import checkpoint as pckpt
        from dsv4.parallel.expert import apply_expert_parallel, expert_params
        from dsv4.parallel.fsdp import job_mesh, shard_model

        whole = None
        if ck is not None and not pckpt.is_distributed(ck):
            self.optimizer = make()
            saved = load_checkpoint(ck, self.model, self.optimizer)
            whole = pckpt.whole_tensors(self.model, self.optimizer)
        cuda_bf16 = self.device.type == "cuda" and self.dtype == torch.bfloat16
        mesh = job_mesh(self.device)
        if tc.ep_size > 1:
            apply_expert_parallel(self.model, mesh)
        ignored = expert_params(self.model)
        self.root = shard_model(
            self.model, torch.bfloat16 if cuda_bf16 else None, tc.activation_checkpoint, mesh, ignored
        )
        self.optimizer = make()
        if whole is not None:
            pckpt.load_whole(whole, self.model, self.optimizer)
            return saved
        return None if ck is None else load_checkpoint(ck, self.model, self.optimizer)

    def call(self, fn, *args, **kwargs):
        """fn(model, *args, **kwargs), through the FSDP2 root in a torchrun job (its parameters gathered)."""
        if self.root is not None:
            return self.root(fn, *args, **kwargs)
        return fn(self.model, *args, **kwargs)

    def engram_dir(self) -> Path:
        """Where mmap Engram tables live; in a torchrun job each rank keeps its own replica (rank<r>/)."""
        base = Path(self.tc.engram_dir) if self.tc.engram_dir else RunDir(self.run).engram_tables
        return base / f"rank{self.dist.rank}" if self.dist.active else base

    def after_backward(self) -> None:
        """Expert parallelism: expert gradients to the job's mean (dsv4.parallel.expert)."""
        if self.tc.ep_size > 1:
            from dsv4.parallel.expert import scale_expert_grads

            scale_expert_grads(self.model, self.dist.world)

    @property
    def job_mean(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The mean over the job's ranks (None in one process): step_loss's KL weighting."""
        return functools.partial(pdist.all_reduce_, op="mean") if self.dist.active else None

    def say(self, message: str) -> None:
        """Print on the main process only."""
        if self.dist.main:
            print(message, flush=True)

    def set_plan(self, total: int) -> None:
        """Fix the run's length and its two warm-ups (stage_plan); warn once when too short to train."""
        self.state["total_steps"] = total
        self.warm, self.lr_warm = stage_plan(total, self.tc, self.has_indexer)
        if self.state["step"] == 0 and total - self.warm < MIN_LM_STEPS and self.dist.main:
            budget = f"{self.tc.minutes:g} minutes" if self.tc.minutes else f"{total} steps"
            notice(
                f"a budget of {budget} gives only {total - self.warm} language-model steps "
                f"({self.warm} more are indexer warm-up): too few to train; the loss will stay near the "
                f"random model's. Give --steps {MIN_LM_STEPS * 4} or more, or a longer --minutes budget."
            )

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (those steps run again)."""
        path = RunDir(self.run).metrics
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind, at = rec.get("kind", "train"), rec.get("step", -1)
            # steps < k ran before checkpoint k; the eval at step k was logged with checkpoint k's weights
            if (kind == "train" and at < step) or (kind == "val" and at <= step):
                keep.append(line)
        path.write_text("".join(x + "\n" for x in keep))

    def write(self, rec: dict) -> None:
        if not self.dist.main:
            return
        with open(RunDir(self.run).metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------- steps
    def set_stage(self, warmup: bool) -> None:
        """Stage 1 freezes everything but the indexers; stage 2 trains all parameters."""
        for n, p in self.model.named_parameters():
            p.requires_grad_(not warmup or ".attn.indexer." in n)

    def train_step(self, step: int) -> dict:
        tc, model = self.tc, self.model
        warmup = step < self.warm
        self.set_stage(warmup)
        total = self.state["total_steps"]
        lr = (
            tc.indexer_lr
            if warmup
            else lr_at(step - self.warm, tc.lr, self.lr_warm, total - self.warm, tc.min_lr_ratio)
        )
        set_lr(self.optimizer, lr)
        batch = self.batch(step)
        seg = batch.segment_ids if tc.doc_mask else None
        model.train()
        pre = None
        if self.engram is not None:
            pre = self.engram.take_prefetched()
            nxt = self.batch(step + 1, on_device=False)  # its rows are read while this step computes
            self.engram.prefetch(nxt.input_ids, nxt.segment_ids if tc.doc_mask else None)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            loss, parts = self.call(
                step_loss, batch.input_ids, batch.targets, seg, warmup, self.mc.mtp_loss_weight, pre, self.job_mean
            )
        rec = {"kind": "train", "step": step, "lr": lr, "stage": "indexer_warmup" if warmup else "sparse"}
        logged = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        logged = pdist.all_reduce_(logged, "mean").tolist()  # the job's mean: every rank decides alike
        rec.update(zip(parts, logged[1:]))
        rec["loss"] = logged[0]
        self.optimizer.zero_grad(set_to_none=True)
        ok = math.isfinite(rec["loss"])
        if ok:
            loss.backward()
            self.after_backward()
            params = [p for p in model.parameters() if p.grad is not None]
            gn = clip_grad_norm(params, tc.grad_clip) if params else torch.tensor(0.0)
            rec["grad_norm"] = norm_value(gn)
            ok = math.isfinite(rec["grad_norm"])
        if ok:
            self._in_update = True  # an interrupt from here until the step ends would leave half-updated state
            self.optimizer.step()
            if self.engram is not None:
                rec.update(self.engram.step(lr, apply=not warmup))
            self.state["bad_steps"] = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.engram is not None:
                self.engram.step(lr, apply=False)  # drop this step's row grads
            self.state["bad_steps"] += 1
            self.state["skipped"] += 1
            warnings.warn(f"step {step}: non-finite loss or gradient ({rec['loss']}); step skipped", stacklevel=2)
            if self.state["bad_steps"] >= tc.max_bad_steps:
                raise TrainingError(
                    f"{self.state['bad_steps']} consecutive steps with a non-finite loss or gradient "
                    f"(last at step {step}); stopping. Lower lr or check the data."
                )
        rec["skipped"] = not ok
        if self.dist.active and self.moes:  # the balancing biases follow the job's expert load
            loads = pdist.all_reduce_(torch.stack([m.load for m in self.moes]))
            for m, load in zip(self.moes, loads):
                m.load.copy_(load)
        rec["maxvio"] = [m.max_violation() if m.load.sum() > 0 else 0.0 for m in self.moes]
        gamma = self.mc.bias_update_speed if tc.bias_update_speed is None else tc.bias_update_speed
        for m in self.moes:
            m.update_bias(gamma if ok and not warmup else 0.0)
        return rec

    def batch(self, step: int, on_device: bool = True):
        """This rank's rows of the batch of `step` (the whole batch in one process), on the device."""
        b = self.data.batches.get(step)
        if self.dist.active:
            rows = pdist.rank_rows(b.input_ids.shape[0], self.dist)
            b = type(b)(b.input_ids[rows], b.targets[rows], b.segment_ids[rows], None)
        return b.to(self.device, non_blocking=True) if on_device else b

    def probe_seconds(self, warmup: bool, repeats: int = 2) -> float:
        """Wall time of one training step of a stage (the last of `repeats`; the first one compiles), run on
        batch 0 at learning rate 0 with everything put back afterwards: the parameters are unchanged (lr = 0),
        the optimiser state is emptied again (it is empty before step 0), MoE loads, Engram row gradients and
        the RNG are restored. Plans a --minutes run before its first step."""
        tc, model = self.tc, self.model
        if self.optimizer.state:
            raise RuntimeError("probe_seconds runs before the first step only")
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        loads = [m.load.clone() for m in self.moes]
        batch = self.batch(0)
        seg = batch.segment_ids if tc.doc_mask else None
        self.set_stage(warmup)
        model.train()
        set_lr(self.optimizer, 0.0)
        dt = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                args = (batch.input_ids, batch.targets, seg, warmup, self.mc.mtp_loss_weight, None, self.job_mean)
                loss, _ = self.call(step_loss, *args)
            if math.isfinite(pdist.all_reduce_(loss.detach().float().clone(), "mean").item()):
                loss.backward()
                self.after_backward()
                params = [p for p in model.parameters() if p.grad is not None]
                gn = clip_grad_norm(params, tc.grad_clip) if params else None
                if gn is not None and math.isfinite(norm_value(gn)):
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.engram is not None:
                self.engram.step(0.0, apply=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t
        self.optimizer.state.clear()
        for m, load in zip(self.moes, loads):
            m.load.copy_(load)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return dt

    def _on_sigint(self, signum, frame):
        """Ctrl-C during the parameter update is held until the step is complete."""
        if self._in_update:
            self._pending_interrupt = True
        else:
            raise KeyboardInterrupt

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, step: int, max_batches: int | None) -> dict:
        was = compiled.enabled()
        compiled.enable(False)  # eval shapes vary: recompiling would cost more than it saves
        try:
            return self._evaluate(step, max_batches)
        finally:
            compiled.enable(was)

    def _evaluate(self, step: int, max_batches: int | None) -> dict:
        tc, model = self.tc, self.model
        model.eval()
        batches = val_batches(
            self.data.val_stream, tc.batch_size, tc.seq_len, max_batches, token_bytes=self.data.token_bytes
        )
        nats, n_tok, n_bytes, first = self.call(score_batches, batches, tc.doc_mask, self.dtype)
        rec = {
            "kind": "val",
            "step": step,
            "val_loss": nats / n_tok,
            "val_bpb": bits_per_byte(nats, n_bytes),
            "val_tokens": n_tok,
        }
        ids = first.input_ids[:1].to(self.device)
        seg = first.segment_ids[:1].to(self.device) if tc.doc_mask else None
        if self.has_indexer:
            rc = self.call(indexer_recall, ids, seg)
            rec["indexer_layers"] = list(rc)
            rec["indexer_recall"] = [v["recall"] for v in rc.values()]
            rec["random_recall"] = [v["random"] for v in rc.values()]
        if not self.mc.is_v32:  # the V3.2 family has a plain residual: no mHC maps
            stats = self.call(lambda m: m(ids, segment_ids=seg, return_stats=True).stats)
            main_maps = stats["res_maps"][: 2 * self.mc.num_hidden_layers]
            fwd, bwd = composite_gain([r.flatten(0, 1) for r in main_maps])
            rec["mhc_gain_fwd"], rec["mhc_gain_bwd"] = fwd, bwd
        model.train()
        return rec

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        tc, st = self.tc, self.state
        tokens_per_step = tc.batch_size * tc.seq_len
        budget = tc.minutes * 60 if tc.minutes else None
        t0 = time.perf_counter() - st["elapsed"]
        start = st["step"]
        if st["total_steps"] is None:  # a --minutes run: its length is planned before its first step
            t_sparse = self.probe_seconds(warmup=False)
            t_warm = self.probe_seconds(warmup=True) if self.has_indexer else t_sparse
            self.set_plan(pdist.broadcast_int(self._plan_steps(budget, time.perf_counter() - t0, t_warm, t_sparse)))
            self.say(
                f"planned {st['total_steps']} steps for {tc.minutes:g} minutes "
                f"({t_sparse:.2f} s per step; {self.warm} of them indexer warm-up)"
            )
        bar = None
        if tc.progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=st["total_steps"], initial=start, unit="step", dynamic_ncols=True, desc="train")
        window_t, window_tok, window_flops = time.perf_counter(), 0, 0.0
        step = start
        self._in_update = self._pending_interrupt = False
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while step < st["total_steps"]:
                rec = self.train_step(step)
                self._in_update = False
                st["tokens"] += tokens_per_step
                window_tok += tokens_per_step
                window_flops += tokens_per_step * (
                    self.flops_warm if rec["stage"] == "indexer_warmup" else self.flops_tok
                )
                step += 1
                st["step"] = step
                st["elapsed"] = time.perf_counter() - t0
                if step % tc.log_every == 0 or step == st["total_steps"]:
                    now = time.perf_counter()
                    rec["tok_per_s"] = window_tok / (now - window_t)
                    rec["mfu"] = window_flops / (now - window_t) / self.peak  # FLOPs of the steps as computed
                    rec["tokens"] = st["tokens"]
                    rec["time"] = st["elapsed"]
                    window_t, window_tok, window_flops = now, 0, 0.0
                    self.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(progress_fields(rec), refresh=False)
                if step % tc.eval_every == 0 and step != st["total_steps"]:
                    self.write(self.evaluate(step, tc.eval_batches))
                if step % tc.ckpt_every == 0 and step != st["total_steps"]:
                    self.save(step, st)
                over = budget is not None and st["elapsed"] > budget * 1.05 and step < st["total_steps"]
                if budget is not None and pdist.broadcast_int(int(over)):  # rank 0's clock decides for the job
                    st["total_steps"] = step  # the plan overran the budget: stop here (the schedule is kept)
                if self._pending_interrupt:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
            if self._in_update:  # raised inside the update itself: this state must not be saved
                print(f"\ninterrupted during the update of step {step}; --resume continues from the last checkpoint")
                raise
            path = self.save(step, st)
            self.say(f"\ninterrupted: saved {path}; continue with --resume")
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()
        self.save(step, st)
        return self.finish(step)

    def save(self, step: int, st: dict) -> Path:
        """Write the checkpoint of `step` atomically (model, optimiser, train state, Engram tables)."""
        tc = self.tc
        extra = self.engram.save if self.engram else None
        return save_checkpoint(self.run, step, self.model, self.optimizer, st, tc.keep_last, extra=extra)

    def _plan_steps(self, budget: float, elapsed: float, t_warm: float, t_sparse: float) -> int:
        """Steps of a --minutes run: the most whose indexer warm-up steps (t_warm s each) and LM steps
        (t_sparse s each), plus periodic evaluations and checkpoints, fit in the budget left after the
        closing evaluation. Kept in the state, so a resumed run uses the same schedule."""
        tc = self.tc
        n_val = len(self.data.val_stream.tokens) if hasattr(self.data.val_stream, "tokens") else 0
        n_val = min(n_val, tc.final_eval_tokens)  # the closing evaluation scores at most this many
        tokens_per_step = tc.batch_size * tc.seq_len
        fwd_time = t_sparse / 3 / tokens_per_step  # a forward pass is about a third of a step
        final_eval = n_val * fwd_time * 1.3
        periodic = (tc.eval_batches * tokens_per_step * fwd_time * 1.5 + min(2.0, t_sparse)) / tc.eval_every
        left = budget - elapsed - final_eval - min(10.0, 0.05 * budget)

        def cost(n: int) -> float:
            warm = stage_plan(n, tc, self.has_indexer)[0]
            return warm * t_warm + (n - warm) * t_sparse * 1.03 + n * periodic

        lo, hi = 1, 1
        while cost(hi * 2) <= left and hi < 10**8:
            hi *= 2
        hi *= 2
        while hi - lo > 1:  # the largest n with cost(n) <= left (cost grows with n)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cost(mid) <= left else (lo, mid)
        return lo

    def finish(self, step: int) -> dict:
        """Full validation pass, xz baseline on the same bytes, a final metrics line."""
        n_batches = max(1, self.tc.final_eval_tokens // (self.tc.batch_size * self.tc.seq_len))
        rec = self.evaluate(step, n_batches)
        self.write(rec)
        if not self.dist.main:  # the job's summary (xz baseline, speed) is rank 0's to write
            return {"kind": "final", "step": step, "val_bpb": rec["val_bpb"], "val_loss": rec["val_loss"]}
        # xz on exactly the bytes the model was scored on: the targets of the evaluated windows
        toks = self.data.val_stream.tokens[1 : rec["val_tokens"] + 1]
        val_bytes = ids_to_bytes(self.data.tokenizer, toks)
        xz = xz_bits_per_byte(val_bytes)
        train = [json.loads(x) for x in RunDir(self.run).metrics.read_text().splitlines()]
        tps = [
            r["tok_per_s"]
            for r in train
            if r.get("kind") == "train" and r.get("stage") == "sparse" and "tok_per_s" in r
        ]
        final = {
            "kind": "final",
            "step": step,
            "val_bpb": rec["val_bpb"],
            "val_loss": rec["val_loss"],
            "xz_bpb": xz,
            "val_bytes": len(val_bytes),
            "tok_per_s": sum(tps) / len(tps) if tps else None,
            "mfu": (sum(tps) / len(tps)) * self.flops_tok / self.peak if tps else None,
            "peak_flops": self.peak,
            "flops_per_token": self.flops_tok,
            "dtype": str(self.dtype),
            "wall_s": self.state["elapsed"],
            "skipped": self.state["skipped"],
            "params": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.dist.world,
        }
        self.write(final)
        return final


def notice(message: str) -> None:
    """A one-line warning for the person at the terminal (stderr), without a Python source line."""
    print(f"dsv4: warning: {message}", file=sys.stderr, flush=True)


def progress_fields(rec: dict) -> dict:
    """The progress bar's postfix for a train record: the stage's own loss (the language model's CE in
    the LM stage, with the indexer's KL beside it; the KL alone during the indexer warm-up), lr, tok/s."""
    if rec["stage"] == "indexer_warmup":
        post = {"stage": "indexer warm-up", "indexer_kl": f"{rec['loss']:.3f}"}
    else:
        post = {"lm_loss": f"{rec.get('lm_loss', rec['loss']):.3f}"}
        if "indexer_loss" in rec:
            post["indexer_kl"] = f"{rec['indexer_loss']:.3f}"
    post["lr"] = f"{rec['lr']:.1e}"
    if "tok_per_s" in rec:
        post["tok/s"] = f"{rec['tok_per_s']:.0f}"
    return post


def norm_value(gn: torch.Tensor) -> float:
    """clip_grad_norm's total norm as a float (a DTensor under FSDP2: its full value)."""
    return float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)


def check_distributed(tc: TrainConfig, mc: ModelConfig, env: pdist.DistEnv) -> None:
    """What a torchrun job of env.world ranks cannot train, as one ConfigError."""
    if tc.batch_size % env.world:
        raise ConfigError(f"batch_size={tc.batch_size} (the global batch) must be a multiple of the {env.world} ranks")
    if tc.ep_size not in (1, env.world):
        raise ConfigError(f"ep_size={tc.ep_size}: expert parallelism spans the whole job, give 1 or {env.world}")
    if tc.fp4_qat and tc.ep_size > 1:
        raise ConfigError("fp4_qat with expert parallelism (ep_size > 1) is not built; use ep_size=1")
    if mc.n_routed_experts % tc.ep_size:
        raise ConfigError(f"ep_size={tc.ep_size} does not divide n_routed_experts={mc.n_routed_experts}")


def prepare_data(tc: TrainConfig, mc: ModelConfig, run: Path, quiet: bool = False) -> RunData:
    """Find files, split by path hash, train (or load) the tokenizer, tokenize both splits (cached).
    quiet: no messages or progress bars (the other ranks of a torchrun job)."""
    show = tc.progress and not quiet
    found = find_files(tc.data)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        files = text_files(found)  # binary / non-UTF-8 files go first, in one warning
    where = tc.data or "the standard library"
    if not files:
        raise DataError(f"no text documents in {where}: none of its {len(found)} files is UTF-8 text")
    train_files, val_files = split_files(files, tc.val_fraction)
    if not train_files or not val_files:
        raise DataError(
            f"need at least 2 text files in {where} to split into train and validation, found {len(files)} ({files[0]})"
        )
    tok_path = RunDir(run).tokenizer
    if tok_path.exists():
        tok = load_tokenizer(tok_path)
    elif tc.tokenizer:
        tok = load_tokenizer(tc.tokenizer)
        shutil.copy(tc.tokenizer, tok_path)
    else:
        print(f"training a {mc.vocab_size}-token byte-level BPE on {len(train_files)} files")
        tok = train_tokenizer(
            (d.text for d in iter_documents(train_files)), mc.vocab_size, tok_path, show_progress=show
        )
    if tok.get_vocab_size() > mc.vocab_size:
        raise ConfigError(f"vocab_size={mc.vocab_size}: the tokenizer has {tok.get_vocab_size()} tokens")
    cache = RunDir(run).cache
    cache.mkdir(exist_ok=True)
    train_stream = tokenize_files_cached(train_files, tok, cache / "train.npz", show_progress=show)
    val_stream = tokenize_files_cached(val_files, tok, cache / "val.npz", show_progress=show)
    tb = token_byte_lengths(tok)
    batches = Batches(train_stream, tc.batch_size, tc.seq_len, tc.seed, token_bytes=tb)
    return RunData(batches, val_stream, tb, tok)


def train(tc: TrainConfig, overrides: list[str] = (), resume: bool = False) -> dict:
    try:
        return Trainer.create(tc, overrides, resume).fit()
    finally:
        compiled.enable(False)  # later generation has varying shapes: eager is the better default there
