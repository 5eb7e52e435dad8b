#!/usr/bin/env python3
"""Train a SAELens TopK SAE on a scalpel activation store, for a side-by-side with scalpel.

Run it with the reference venv (torch, sae-lens 6.54.12)::

    PY=/root/.cache/scalpel/ref-venv/bin/python
    $PY scripts/saelens_train.py --store /work/runs/store-l15 \\
        --hook blocks.15.hook_resid_post --tokens 200000 --out /tmp/saelens-sae \\
        --write-views /tmp/store-views > result.json

stdout gets one JSON report; progress goes to stderr. All flags: ``--help``.

What it does
------------
1. Reads the store's manifest.json (a snapshot: a store still being harvested works, only its
   complete shards are used) and memory-maps the shard safetensors files with numpy.
2. Splits the shards: the *eval* split is the fewest trailing shards of the store that hold at
   least ``--eval-rows`` stored rows (default 65536: 8 full shards of 64 x 128 contexts, or 9 when
   the last shard is partial), the *train* split is every shard before them. Masked rows are
   dropped in both (below), so the eval split holds somewhat fewer rows than it stores.
   Splitting on whole shards lets scalpel read the very same rows: ``--write-views DIR`` writes
   ``DIR/train`` and ``DIR/eval``, two valid stores (a copy of the manifest listing only that
   split's shards, and symlinks to the original shard files, renumbered from 0 in the eval view),
   so ``scalpel train`` with its store set to ``DIR/train`` (same seed, batch_size,
   shuffle_buffer_shards, tokens) is fed byte-identical batches in the identical order.
3. Builds the training stream as ``scalpel train`` reads a store (Source::for_each_batch in
   crates/scalpel-dict/src/run/data.rs): epoch ``e`` is one ``StoreReader::batches(hook,
   batch_size, epoch_seed(seed, e), shuffle_buffer_shards)`` (epoch_seed = splitmix64 of the
   pair, reimplemented), an epoch's short last batch is dropped, and training takes
   ``ceil(tokens / batch_size)`` full batches. ``StoreReader::batches`` (crates/scalpel-data/src/
   store.rs) is mirrored exactly, including its RNG: Rust ``rand 0.8``
   ``StdRng::seed_from_u64(seed)`` (PCG32 seed expansion, then ChaCha12) is reimplemented, so
     * shard visiting order = ``order = [0..n_train_shards)`` shuffled by ``SliceRandom::shuffle``
       (Fisher-Yates from the back, ``gen_range(0..i+1 as u32)``);
     * within a shard, masked rows are dropped, the kept rows keep their store order;
     * a pool takes shards in that order while ``pool + next shard's *unmasked* row count <=
       shuffle_buffer_shards * contexts_per_shard * context_size`` or the pool holds fewer than
       ``batch_size`` rows; each batch row is ``pool.swap_remove(rng.gen_range(0..pool.len()))``
       (usize range, 64-bit draws), the same RNG continuing after the shuffle;
     * the last batch of an epoch may be short (and is then dropped, as ``scalpel train`` does).
   The RNG, epoch_seed and the pool logic were checked against rand 0.8.8 and a verbatim copy of
   ``Batches::{refill,next}`` compiled in Rust (shuffles, 60k range draws, 3 batch streams with
   masked and partial shards: identical).
   Masking (as the Rust loader): a row (position ``r % context_size`` of its context) is kept
   iff its token id (shard tensor ``tokens``) is not in ``meta.exclude_token_ids`` and its position
   is kept by ``meta.seqpos_slice`` (Python slice semantics, ``None`` keeps all).
   ``--order sequential`` instead feeds the kept train rows in store order (shard 0 first), cut
   into consecutive batches (no shuffle; not what scalpel does).
   scalpel's init sample (b_dec init, normalisation factor; Source::sample) is mirrored too: the
   first ``--init-sample-rows`` rows of ``StoreReader::batches(hook, n, epoch_seed(seed,
   u64::MAX), shuffle_buffer_shards)`` of the train split.
4. Preloads the whole token budget (the concatenated batches) into one f32 tensor, *then* times
   only ``SAETrainer.fit()`` (SAELens's own trainer: Adam, grad-norm clipping at 1.0 - SAELens
   always clips -, constant LR unless warm-up/decay are given, AuxK with k_aux = d_in/2 and the
   dead mask ``steps since fired > dead_feature_window``; no wandb, no evals).
5. Evaluates on the eval split and saves the SAE with ``save_inference_model(--out)`` (SAELens's
   inference format: cfg.json + sae_weights.safetensors, decoder-norm rescaling folded into the
   weights so W_dec rows have unit norm; and normalisation scaling folded in by SAELens's fit()),
   plus ``sparsity.safetensors`` (log10 feature density over the eval split, SAELens's
   convention). ``--save-training-format`` also writes the un-folded training checkpoint.

Reported JSON
-------------
``activations_per_s`` = trained rows / ``wall_s`` (wall_s = fit() only); ``load_s`` = store
reading, masking and batch assembly (not timed in wall_s); ``final`` on the eval split:
  * ``mse``: mean over eval rows of ||x - x_hat||^2 (sum over d, as SAELens's mse_loss and
    scalpel's StepStats.mse); ``mse_per_element`` = that / d_in.
  * ``explained_variance``: 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2, the mean
    and both sums over *all* eval rows pooled (one batch = the whole eval split; scalpel's
    StepStats.explained_variance formula).
  * ``explained_variance_saelens``: SAELens's training-log ``metrics/explained_variance`` (same
    formula, mean taken per batch) averaged over eval batches of ``--batch-size`` rows in store
    order; ``explained_variance_legacy``: SAELens's ``explained_variance_legacy`` (mean over rows
    of 1 - ||x - x_hat||^2 / ||x - batch mean||^2).
  * ``l0``: mean number of nonzero latents per eval row (TopK after ReLU, so <= k).
  * ``dead_fraction``: latents that fired on none of the eval rows AND are dead in SAELens's
    training window at the end of training (not fired in the last ``dead_feature_window``
    steps); ``dead_fraction_eval`` and ``dead_fraction_train_window`` give each alone.

Hyperparameters (defaults): --lr 4e-4, --adam-beta1 0.9, --adam-beta2 0.999, --batch-size 4096,
--tokens (required), --lr-warm-up-steps 0, --lr-decay-steps 0 (constant LR; SAELens's
"constant" scheduler with warm-up/decay when nonzero, lr_end = lr/10), --seed 42 (torch init,
the data order and the init sample), --k 32, --d-sae 9216, --dead-feature-window 1000000 tokens
(SAELens counts steps: window_steps = tokens // batch_size), --normalize-activations
none|expected_average_only_in (the factor sqrt(d_in)/mean||x|| is computed as scalpel does, over
the init sample, and handed to SAELens's ActivationScaler, which folds it into the weights at
the end; SAELens itself would estimate it over 1000 provider batches), --b-dec-init zeros
(SAELens 6.54 has no b_dec initialisation: b_dec starts at zero; ``mean`` and
``geometric_median`` - scalpel's default; Weiszfeld from the mean in f64, 100 iterations, as
scalpel's run/init.rs - set b_dec from the scaled init sample before SAETrainer starts, outside
SAELens; give scalpel the same b_dec_init), --rescale-acts-by-decoder-norm true (SAELens's TopK
training default), --aux-loss-coefficient 1.0 (SAELens default), --use-sparse-activations off
(SAELens default; on this CPU build, torch 2.15, it fails in backward: aten::view has no
SparseCPU kernel), --decoder-init-norm 0.1 (SAELens default; W_enc starts as W_dec^T),
--shuffle-buffer-shards 16 (``scalpel train``'s default), --init-sample-rows 16384 (scalpel's),
--threads 2.

Measured (this 2-core machine, torch threads 2, otherwise idle, load average 1.1-1.9 of which
2 is this run): d_in 576, d_sae 9216, k 32, batch 4096 trains at about 1.7-1.9k activations/s
(49-step runs: 1886, 1794, 1768/s; a 20-step run: 1690/s). Under load 8 (a harvest and
cargo builds beside it) the same run reached 636/s.

Transcoders: SAELens 6.54 cannot train transcoders. Its Transcoder, SkipTranscoder and JumpReLU
transcoder classes are inference-only (no TrainingSAE subclass, no training config, the trainer
feeds a single tensor as both input and target), so ``--transcoder`` only prints this and exits 2.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1


# --------------------------------------------------------------------------------------------
# Rust rand 0.8 StdRng (ChaCha12, rand_chacha 0.3) and the parts of rand the store reader uses.
# --------------------------------------------------------------------------------------------


class RustStdRng:
    """``rand::rngs::StdRng::seed_from_u64(seed)`` of rand 0.8: a ChaCha12 word stream."""

    BLOCKS_PER_REFILL = 256

    def __init__(self, seed: int):
        state = seed & MASK64
        key = []
        for _ in range(8):  # rand_core 0.6 seed_from_u64: PCG32 fills the 32-byte seed
            state = (state * 6364136223846793005 + 11634580027462260723) & MASK64
            xorshifted = (((state >> 18) ^ state) >> 27) & MASK32
            rot = state >> 59
            key.append(((xorshifted >> rot) | (xorshifted << ((32 - rot) & 31))) & MASK32)
        self.key = np.array(key, dtype=np.uint32)
        self.block = 0  # 64-bit block counter (words 12, 13); stream id (14, 15) is 0
        self.words: list[int] = []
        self.pos = 0

    def _refill(self):
        n = self.BLOCKS_PER_REFILL
        ctr = np.arange(self.block, self.block + n, dtype=np.uint64)
        self.block += n
        init = np.zeros((16, n), dtype=np.uint32)
        init[0:4] = np.array([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574], np.uint32)[:, None]
        init[4:12] = self.key[:, None]
        init[12] = (ctr & np.uint64(MASK32)).astype(np.uint32)
        init[13] = (ctr >> np.uint64(32)).astype(np.uint32)
        x = [init[i].copy() for i in range(16)]

        def rotl(v, c):
            return (v << np.uint32(c)) | (v >> np.uint32(32 - c))

        def qr(a, b, c, d):
            x[a] += x[b]; x[d] ^= x[a]; x[d] = rotl(x[d], 16)
            x[c] += x[d]; x[b] ^= x[c]; x[b] = rotl(x[b], 12)
            x[a] += x[b]; x[d] ^= x[a]; x[d] = rotl(x[d], 8)
            x[c] += x[d]; x[b] ^= x[c]; x[b] = rotl(x[b], 7)

        for _ in range(6):  # 12 rounds
            qr(0, 4, 8, 12); qr(1, 5, 9, 13); qr(2, 6, 10, 14); qr(3, 7, 11, 15)
            qr(0, 5, 10, 15); qr(1, 6, 11, 12); qr(2, 7, 8, 13); qr(3, 4, 9, 14)
        out = np.stack(x) + init  # [16, n]
        self.words = self.words[self.pos:] + out.T.reshape(-1).tolist()
        self.pos = 0

    def next_u32(self) -> int:
        if self.pos >= len(self.words):
            self._refill()
        w = self.words[self.pos]
        self.pos += 1
        return w

    def next_u64(self) -> int:
        # BlockRng::next_u64: two consecutive words, low first (also across a refill).
        if self.pos + 1 >= len(self.words):
            self._refill()
        lo, hi = self.words[self.pos], self.words[self.pos + 1]
        self.pos += 2
        return lo | (hi << 32)

    def gen_range_u32(self, n: int) -> int:
        """``gen_range(0..n)`` for u32 (UniformInt::sample_single, rand 0.8)."""
        rng = n & MASK32
        lz = 32 - rng.bit_length()
        zone = ((rng << lz) - 1) & MASK32
        while True:
            m = self.next_u32() * rng
            if (m & MASK32) <= zone:
                return m >> 32

    def gen_range_u64(self, n: int) -> int:
        """``gen_range(0..n)`` for usize on a 64-bit target."""
        lz = 64 - n.bit_length()
        zone = ((n << lz) - 1) & MASK64
        while True:
            m = self.next_u64() * n
            if (m & MASK64) <= zone:
                return m >> 64

    def shuffle(self, items: list) -> None:
        """``SliceRandom::shuffle`` (rand 0.8): Fisher-Yates from the back."""
        for i in range(len(items) - 1, 0, -1):
            j = self.gen_range_u32(i + 1)  # gen_index: ubound <= u32::MAX
            items[i], items[j] = items[j], items[i]


# --------------------------------------------------------------------------------------------
# The store.
# --------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return header, 8 + n


def tensor_view(path: Path, name: str) -> np.ndarray:
    """Memory-maps tensor ``name`` of a safetensors file, returned as f32 or u32."""
    header, base = read_safetensors_header(path)
    info = header[name]
    start, end = info["data_offsets"]
    dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}[info["dtype"]]
    count = (end - start) // np.dtype(dt).itemsize
    arr = np.memmap(path, dtype=dt, mode="r", offset=base + start, shape=(count,))
    arr = arr.reshape(info["shape"])
    if info["dtype"] == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] == "F16":
        arr = arr.astype(np.float32)
    return arr


def seqpos_mask(sl, n: int) -> np.ndarray:
    """``SeqPosSlice::mask`` of store.rs."""
    if sl is None:
        return np.ones(n, dtype=bool)

    def clamp(i):
        return max(n + i, 0) if i < 0 else min(i, n)

    start = 0 if sl.get("start") is None else clamp(sl["start"])
    end = n if sl.get("end") is None else clamp(sl["end"])
    step = max(sl.get("step") or 1, 1)
    i = np.arange(n)
    return (i >= start) & (i < end) & ((i - start) % step == 0)


class Store:
    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        if self.manifest["format_version"] != 1:
            raise SystemExit(f"store format version {self.manifest['format_version']}, expected 1")
        self.meta = self.manifest["meta"]
        self.shards = self.manifest["shards"]
        self.ctx = self.meta["context_size"]
        self.cps = self.meta["contexts_per_shard"]
        self.exclude = np.array(self.meta.get("exclude_token_ids") or [], dtype=np.uint32)
        self.positions = seqpos_mask(self.meta.get("seqpos_slice"), self.ctx)
        self.masked = len(self.exclude) > 0 or self.meta.get("seqpos_slice") is not None

    def hook_d(self, hook: str) -> int:
        for h in self.meta["hooks"]:
            if h["name"] == hook:
                return h["d"]
        names = [h["name"] for h in self.meta["hooks"]]
        raise SystemExit(f"hook {hook!r} is not in the store (it has {names})")

    def shard_path(self, i: int) -> Path:
        return self.dir / "shards" / self.shards[i]["file"]

    def keep_mask(self, i: int) -> np.ndarray:
        """Rows of shard ``i`` that StoreReader::batches yields (store order)."""
        n_rows = self.shards[i]["n_contexts"] * self.ctx
        if not self.masked:
            return np.ones(n_rows, dtype=bool)
        tokens = np.asarray(tensor_view(self.shard_path(i), "tokens")).reshape(-1)
        keep = np.tile(self.positions, self.shards[i]["n_contexts"])
        if len(self.exclude):
            keep &= ~np.isin(tokens, self.exclude)
        return keep

    def kept_rows(self, i: int, hook: str) -> np.ndarray:
        acts = tensor_view(self.shard_path(i), hook)
        d = self.hook_d(hook)
        n_rows = self.shards[i]["n_contexts"] * self.ctx
        if acts.shape != (n_rows, d):
            raise SystemExit(f"{self.shard_path(i)}: {hook} has shape {acts.shape}, expected {(n_rows, d)}")
        return np.ascontiguousarray(acts[self.keep_mask(i)], dtype=np.float32)

    def write_view(self, out: Path, shard_ids: list[int]) -> None:
        """A valid store at ``out`` holding ``shard_ids`` (symlinked, renumbered from 0)."""
        (out / "shards").mkdir(parents=True, exist_ok=True)
        entries = []
        for new, old in enumerate(shard_ids):
            e = dict(self.shards[old])
            e["file"] = f"shard-{new:06d}.safetensors"
            link = out / "shards" / e["file"]
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(self.shard_path(old).resolve())
            entries.append(e)
        m = {"format_version": 1, "meta": self.meta, "shards": entries}
        (out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")


def epoch_seed(seed: int, epoch: int) -> int:
    """``epoch_seed`` of crates/scalpel-dict/src/run/data.rs (splitmix64 of the pair)."""
    z = (seed ^ (epoch * 0x9E3779B97F4A7C15)) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def geometric_median(rows: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """``geometric_median`` of crates/scalpel-dict/src/run/init.rs: Weiszfeld from the mean, f64."""
    x = rows.astype(np.float64)
    y = x.mean(0)

    def objective(p):
        return float(np.sqrt(((x - p) ** 2).sum(1)).sum())

    best = objective(y)
    for _ in range(max_iter):
        w = 1.0 / np.maximum(np.sqrt(((x - y) ** 2).sum(1)), 1e-8)
        y = (w[:, None] * x).sum(0) / w.sum()
        value = objective(y)
        if best - value <= 1e-9 * best:
            break
        best = value
    return y.astype(np.float32)


def batch_index_lists(kept_counts, unmasked_rows, capacity_rows, batch_size, seed, max_batches=None):
    """One epoch of ``StoreReader::batches``: lists of indices into the concatenation of the
    kept rows of the (train) shards in store order."""
    offsets = np.concatenate([[0], np.cumsum(kept_counts)]).tolist()
    rng = RustStdRng(seed)
    order = list(range(len(kept_counts)))
    rng.shuffle(order)
    pending = [unmasked_rows[i] for i in order]
    nxt = 0
    pool: list[int] = []
    batches = []
    while True:
        while nxt < len(order):  # Batches::refill
            rows = pending[nxt]
            if len(pool) + rows > capacity_rows and len(pool) >= batch_size:
                break
            s = order[nxt]
            pool.extend(range(offsets[s], offsets[s] + kept_counts[s]))
            nxt += 1
        n = min(batch_size, len(pool))
        if n == 0 or (max_batches is not None and len(batches) >= max_batches):
            return batches
        out = []
        for _ in range(n):
            i = rng.gen_range_u64(len(pool))
            last = pool.pop()
            if i < len(pool):
                out.append(pool[i])
                pool[i] = last
            else:
                out.append(last)
        batches.append(out)


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="scalpel store directory")
    p.add_argument("--hook", default=None, help="hook to train on (default: the store's first)")
    p.add_argument("--out", required=True, help="directory for the trained SAE (SAELens inference format)")
    p.add_argument("--tokens", type=int, required=True, help="training token budget (rows)")
    p.add_argument("--eval-rows", type=int, default=65536,
                   help="held-out stored rows, rounded up to whole shards at the end of the store")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.999)
    p.add_argument("--lr-warm-up-steps", type=int, default=0)
    p.add_argument("--lr-decay-steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--dead-feature-window", type=int, default=1_000_000, help="in tokens")
    p.add_argument("--normalize-activations", choices=["none", "expected_average_only_in"], default="none")
    p.add_argument("--b-dec-init", choices=["zeros", "mean", "geometric_median"], default="zeros")
    p.add_argument("--rescale-acts-by-decoder-norm", choices=["true", "false"], default="true")
    p.add_argument("--aux-loss-coefficient", type=float, default=1.0)
    p.add_argument("--decoder-init-norm", type=float, default=0.1)
    p.add_argument("--use-sparse-activations", action="store_true",
                   help="SAELens's sparse TopK activations (COO decode); off by default, as in SAELens")
    p.add_argument("--shuffle-buffer-shards", type=int, default=16)
    p.add_argument("--order", choices=["scalpel", "sequential"], default="scalpel")
    p.add_argument("--init-sample-rows", type=int, default=16384,
                   help="rows of scalpel's init sample (b_dec init, normalisation factor)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-views", default=None,
                   help="write DIR/train and DIR/eval stores (symlinks) for scalpel to read the same rows")
    p.add_argument("--save-training-format", action="store_true",
                   help="also save the un-folded training checkpoint under OUT/training")
    p.add_argument("--transcoder", nargs=2, metavar=("IN_HOOK", "OUT_HOOK"), default=None,
                   help="not supported: SAELens 6.54 cannot train transcoders")
    return p.parse_args(argv)


def log(msg):
    print(f"[saelens_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.transcoder:
        print("SAELens 6.54 cannot train transcoders (its transcoder classes are inference-only; "
              "SAETrainer feeds one tensor as input and target). Not trained.", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    import sae_lens
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    t_load = time.perf_counter()
    store = Store(args.store)
    hook = args.hook or store.meta["hooks"][0]["name"]
    d = store.hook_d(hook)
    n_shards = len(store.shards)
    rows_per_shard = store.cps * store.ctx
    # Eval = the fewest trailing shards holding >= --eval-rows stored (unmasked) rows.
    n_eval_shards, stored = 0, 0
    while stored < args.eval_rows and n_eval_shards < n_shards:
        n_eval_shards += 1
        stored += store.shards[n_shards - n_eval_shards]["n_contexts"] * store.ctx
    if n_eval_shards >= n_shards:
        raise SystemExit(f"store has {n_shards} complete shards; {n_eval_shards} are needed for eval alone")
    train_ids = list(range(n_shards - n_eval_shards))
    eval_ids = list(range(n_shards - n_eval_shards, n_shards))
    if args.write_views:
        store.write_view(Path(args.write_views) / "train", train_ids)
        store.write_view(Path(args.write_views) / "eval", eval_ids)

    # Kept rows of every train shard, in store order (masked rows dropped).
    train_parts = [store.kept_rows(i, hook) for i in train_ids]
    kept_counts = [len(a) for a in train_parts]
    unmasked = [store.shards[i]["n_contexts"] * store.ctx for i in train_ids]
    train_rows = np.concatenate(train_parts)
    del train_parts
    eval_rows = np.concatenate([store.kept_rows(i, hook) for i in eval_ids])

    # The budget's batches, in the order StoreReader::batches yields them.
    batches: list[list[int] | tuple[int, int]] = []
    total, epoch = 0, 0
    capacity = args.shuffle_buffer_shards * rows_per_shard
    while total < args.tokens:
        if args.order == "scalpel":
            ep = batch_index_lists(kept_counts, unmasked, capacity, args.batch_size,
                                   epoch_seed(args.seed, epoch))
        else:
            n = len(train_rows)
            ep = [(s, min(s + args.batch_size, n)) for s in range(0, n, args.batch_size)]
        # `scalpel train` drops an epoch's short last batch.
        ep = [b for b in ep if (len(b) if isinstance(b, list) else b[1] - b[0]) == args.batch_size]
        if not ep:
            raise SystemExit("the train split has fewer rows than one batch")
        for b in ep:
            if total >= args.tokens:
                break
            batches.append(b)
            total += len(b) if isinstance(b, list) else b[1] - b[0]
        epoch += 1
    # scalpel's init sample: the first batch of `init_sample_rows` rows of the seed's
    # `epoch_seed(seed, u64::MAX)` shuffle (Source::sample).
    sample_idx = batch_index_lists(kept_counts, unmasked, capacity, max(args.init_sample_rows, 1),
                                   epoch_seed(args.seed, MASK64), max_batches=1)[0]
    sample = train_rows[np.array(sample_idx, dtype=np.int64)]
    if args.order == "scalpel":
        flat = np.fromiter((i for b in batches for i in b), dtype=np.int64, count=total)
        data = torch.from_numpy(train_rows[flat])
    else:
        data = torch.from_numpy(np.concatenate([train_rows[s:e] for s, e in batches]))
    sizes = [len(b) if isinstance(b, list) else b[1] - b[0] for b in batches]
    first_rows = {"first_batch_first_row_sum": float(data[0].double().sum())}
    del train_rows
    load_s = time.perf_counter() - t_load
    log(f"loaded {total} training rows ({len(batches)} batches, {epoch} epoch(s) begun) and "
        f"{len(eval_rows)} eval rows of {hook} (d {d}) in {load_s:.1f}s")

    # --- SAELens objects ---
    torch.manual_seed(args.seed)
    window_steps = max(1, args.dead_feature_window // args.batch_size)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d,
        d_sae=args.d_sae,
        k=args.k,
        dtype="float32",
        device="cpu",
        normalize_activations=args.normalize_activations,
        aux_loss_coefficient=args.aux_loss_coefficient,
        rescale_acts_by_decoder_norm=args.rescale_acts_by_decoder_norm == "true",
        decoder_init_norm=args.decoder_init_norm,
        use_sparse_activations=args.use_sparse_activations,
    )
    sae_cfg.metadata.hook_name = hook
    sae_cfg.metadata.model_name = store.meta.get("model")
    sae_cfg.metadata.context_size = store.ctx
    sae = TopKTrainingSAE(sae_cfg)
    scaling_factor = None
    if args.normalize_activations == "expected_average_only_in":
        # scalpel's norm_scaling_factor over its init sample. (SAELens would estimate it over
        # n_batches_for_norm_estimate=1000 batches drawn from the provider; same formula.)
        scaling_factor = float(d**0.5 / np.sqrt((sample.astype(np.float64) ** 2).sum(1)).mean())
    if args.b_dec_init != "zeros":
        scaled = sample * np.float32(scaling_factor or 1.0)
        b = scaled.astype(np.float64).mean(0).astype(np.float32) if args.b_dec_init == "mean" \
            else geometric_median(scaled)
        with torch.no_grad():
            sae.b_dec.copy_(torch.from_numpy(b))

    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        lr_warm_up_steps=args.lr_warm_up_steps,
        lr_decay_steps=args.lr_decay_steps,
        lr_end=args.lr / 10,
        device="cpu",
        dead_feature_window=window_steps,
        feature_sampling_window=10**9,
    )
    trainer_cfg.logger.log_to_wandb = False

    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    def provider():
        for j in range(len(sizes)):
            yield data[offsets[j]:offsets[j + 1]]

    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider())
    if scaling_factor is not None:
        trainer.activation_scaler.scaling_factor = scaling_factor

    log(f"training: {len(sizes)} steps, torch threads {torch.get_num_threads()}")
    load_avg_before = os.getloadavg()
    t0 = time.perf_counter()
    sae = trainer.fit()
    wall = time.perf_counter() - t0
    load_avg_after = os.getloadavg()
    log(f"trained in {wall:.1f}s ({total / wall:.0f} activations/s)")

    # --- eval ---
    sae.eval()
    x_all = torch.from_numpy(eval_rows)
    mean = x_all.double().mean(0)
    sse = 0.0
    sst = 0.0
    l0_sum = 0.0
    fired = torch.zeros(args.d_sae, dtype=torch.bool)
    fire_counts = torch.zeros(args.d_sae, dtype=torch.float64)
    ev_batches, ev_legacy = [], []
    with torch.no_grad():
        for s in range(0, len(x_all), args.batch_size):
            x = x_all[s:s + args.batch_size]
            acts = sae.encode(x)
            xh = sae.decode(acts)
            err = (x - xh).double().pow(2).sum(-1)
            sse += float(err.sum())
            sst += float((x.double() - mean).pow(2).sum())
            nz = acts != 0
            l0_sum += float(nz.sum())
            fired |= nz.any(0)
            fire_counts += nz.sum(0).double()
            tv = (x.double() - x.double().mean(0)).pow(2).sum(-1)
            ev_batches.append(1 - float(err.mean() / tv.mean()))
            ev_legacy.extend((1 - err / tv).tolist())
    n_eval = len(x_all)
    dead_train = trainer.dead_neurons.cpu()
    dead_eval = ~fired
    final = {
        "mse": sse / n_eval,
        "mse_per_element": sse / n_eval / d,
        "explained_variance": 1 - sse / sst,
        "explained_variance_saelens": float(np.mean(ev_batches)),
        "explained_variance_legacy": float(np.mean(ev_legacy)),
        "l0": l0_sum / n_eval,
        "dead_fraction": float((dead_eval & dead_train).double().mean()),
        "dead_fraction_eval": float(dead_eval.double().mean()),
        "dead_fraction_train_window": float(dead_train.double().mean()),
        "eval_rows": n_eval,
    }

    out = Path(args.out)
    sae.save_inference_model(out)
    from safetensors.torch import save_file

    density = (fire_counts / max(n_eval, 1)).float()
    save_file({"sparsity": torch.log10(density + 1e-10)}, out / "sparsity.safetensors")
    if args.save_training_format:
        sae.save_model(out / "training")

    report = {
        "activations_per_s": total / wall,
        "wall_s": wall,
        "load_s": load_s,
        "steps": trainer.n_training_steps,
        "tokens": total,
        "final": final,
        "hyperparameters": {
            "hook": hook, "d_in": d, "d_sae": args.d_sae, "k": args.k,
            "lr": args.lr, "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
            "adam_eps": 1e-8, "grad_clip_norm": 1.0,
            "batch_size": args.batch_size, "lr_warm_up_steps": args.lr_warm_up_steps,
            "lr_decay_steps": args.lr_decay_steps, "lr_scheduler": "constant",
            "seed": args.seed, "dead_feature_window_tokens": args.dead_feature_window,
            "dead_feature_window_steps": window_steps,
            "normalize_activations": args.normalize_activations,
            "scaling_factor": scaling_factor,
            "b_dec_init": args.b_dec_init,
            "rescale_acts_by_decoder_norm": args.rescale_acts_by_decoder_norm == "true",
            "aux_loss_coefficient": args.aux_loss_coefficient, "k_aux": d // 2,
            "decoder_init_norm": args.decoder_init_norm,
            "use_sparse_activations": args.use_sparse_activations,
            "order": args.order, "shuffle_buffer_shards": args.shuffle_buffer_shards,
            "init_sample_rows": len(sample),
        },
        "data": {
            "store": str(store.dir), "store_shards": n_shards,
            "train_shards": [train_ids[0], train_ids[-1]] if train_ids else [],
            "eval_shards": [eval_ids[0], eval_ids[-1]],
            "train_rows_available": int(sum(kept_counts)), "epochs_begun": epoch,
            "last_batch_rows": sizes[-1], **first_rows,
            "views": args.write_views,
        },
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "sae_lens_version": sae_lens.__version__,
        "load_average_before_after": [load_avg_before[0], load_avg_after[0]],
        "out": str(out),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
