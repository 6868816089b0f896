"""Per-class linear SVMs on SPP features, trained with hard-negative mining.

The R-CNN protocol that SPPnet kept (``py-faster-rcnn/tools/train_svms.py``
has it in the same shape): positives are the ground-truth boxes of the class;
negatives are proposals under IoU 0.3 with every ground truth of the class;
features are scaled so that their mean L2 norm is 20; an L2-regularised linear
SVM with positive weight 2 and bias multiplier 10 (C 0.1: measured, see
:class:`~spp_cli.config.SVMConfig`); one epoch of hard-negative mining: a
negative is hard if it scores above -1.0001, cached easy negatives below -1.2
are evicted, and a class is retrained after every 2,000 new hard negatives.

The loss is the squared hinge (liblinear ``-s 2``'s objective), solved by
Newton steps in torch and started from the class's previous model at each
retrain (:func:`newton_squared_hinge`); R-CNN's hinge through liblinear
(``-s 3``) stays one setting away (``SVMConfig.solver``). The hard negatives of
all classes share one store of rows (:class:`NegativeStore`): a window that
is hard for several classes is kept once.

Shape letters: K classes, D feature length, P positives, N negatives.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from spp_cli import boxes as box_ops
from spp_cli.config import SVMConfig
from spp_cli.fileio import StreamedTensor


@dataclass
class LinearSVMs:
    """K one-vs-rest linear classifiers: ``score = x @ weight[k] + bias[k]``.

    Attributes:
        classes: K class names.
        weight: ``(K, D)`` float32.
        bias: ``(K,)`` float32.
        feature_scale: multiply raw pool5 features by this first.
    """

    classes: list[str]
    weight: np.ndarray
    bias: np.ndarray
    feature_scale: float

    def scores(self, features: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """``(R, D)`` features -> ``(R, K)`` scores.

        ``scaled=False`` takes raw features and applies ``feature_scale`` to
        the ``(R, K)`` products instead (no scaled copy of the features).
        """
        w = torch.from_numpy(self.weight).to(features.device)
        b = torch.from_numpy(self.bias).to(features.device)
        if scaled:
            return features @ w.T + b
        return torch.addmm(b, features, w.T, alpha=self.feature_scale)


@dataclass
class _ClassState:
    """Training state of one class: positives and its hard negatives (rows of the shared store)."""

    positives: list[np.ndarray] = field(default_factory=list)  # fp16 rows
    negatives: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,) row numbers in the store, increasing
    new_since_retrain: int = 0
    weight: np.ndarray | None = None
    bias: float = 0.0
    retrains: int = 0
    # (P + N,) float32 scores of the rows (positives, then negatives) under weight and bias, kept
    # with the Newton solver (its next solve starts from them); None before the first fit.
    scores: np.ndarray | None = None


class NegativeStore:
    """The hard negatives' feature rows, each window stored once whatever number of classes
    holds it (with K classes a window is a candidate negative of every class it does not
    overlap, so per-class copies cost up to K times the memory: 69 classes on coco128).

    Rows are fp16 ``(D,)`` in chunks of ``chunk_rows`` rows; a class refers to rows by
    number. Numbers only grow as rows are added, so a class's rows stay in the order they
    were mined; :meth:`compact` drops rows no class holds and renumbers, keeping that order.

    Why chunks: one growing array copied every row again at each growth (half as much
    again each time) and touched every page of each new array; on coco128 (16,000-d rows,
    gigabytes of them) that was 18 s of a 200 s SVM step.

    With ``spill`` (a folder), chunks past the first ``memory_rows`` rows are files there,
    mapped into memory (unlinked at once: nothing is left behind, even on a kill). Their pages
    are the page cache's, which the system can write back and drop under memory pressure,
    where rows in anonymous memory (there is no swap on many machines) end the process: with
    many classes nearly every window of every image is hard for some class, so the store
    grows with the training set (coco128's 86 fit images: 99,464 rows, 3.2 GB, 69 classes).
    """

    def __init__(self, dim: int, chunk_rows: int = 4096, spill: Path | None = None, memory_rows: int | None = None):
        self.dim, self.chunk_rows = dim, chunk_rows
        self.spill, self.memory_rows = spill, memory_rows
        self.chunks: list[np.ndarray] = []
        self.count = 0

    def _new_chunk(self) -> np.ndarray:
        """An uninitialised ``(chunk_rows, D)`` fp16 chunk for the next place in ``chunks``: in memory,
        or a mapped file in ``spill`` once ``memory_rows`` rows are in memory before it."""
        in_memory = sum(1 for chunk in self.chunks if chunk is not None and not isinstance(chunk, np.memmap))
        if self.spill is None or self.memory_rows is None or in_memory * self.chunk_rows < self.memory_rows:
            return np.empty((self.chunk_rows, self.dim), np.float16)
        with tempfile.TemporaryFile(dir=self.spill, prefix="spp-negatives-") as file:  # the mapping outlives the name and the handle
            return np.memmap(file, np.float16, "w+", shape=(self.chunk_rows, self.dim))

    def add(self, rows: np.ndarray) -> np.ndarray:
        """Append ``(R, D)`` rows; their numbers ``(R,)``."""
        numbers = np.arange(self.count, self.count + len(rows))
        at = 0
        while at < len(rows):
            chunk, offset = divmod(self.count, self.chunk_rows)
            if chunk == len(self.chunks):
                self.chunks.append(self._new_chunk())
            taken = min(len(rows) - at, self.chunk_rows - offset)
            self.chunks[chunk][offset : offset + taken] = rows[at : at + taken]
            at += taken
            self.count += taken
        return numbers

    def blocks(self, numbers: np.ndarray, size: int = 512) -> Iterable[np.ndarray]:
        """The rows of ``numbers`` (increasing), in that order, as ``(n, D)`` blocks of at most ``size``."""
        for at in range(0, len(numbers), size):
            yield from _rows_of(self.chunks, self.chunk_rows, numbers[at : at + size])

    def take(self, numbers: np.ndarray) -> np.ndarray:
        """``(N, D)`` fp16 rows of ``numbers`` (increasing), in one array."""
        return np.concatenate([np.zeros((0, self.dim), np.float16), *self.blocks(numbers, 4096)])

    def compact(self, holders: list[np.ndarray]) -> list[np.ndarray]:
        """Keep only the rows in ``holders`` (each class's row numbers); their new numbers."""
        live = np.unique(np.concatenate(holders)) if holders else np.zeros(0, np.int64)
        old, self.chunks, self.count = self.chunks, [], 0
        for at in range(0, len(live), self.chunk_rows):
            part = live[at : at + self.chunk_rows]
            self.chunks.append(self._new_chunk())
            self.chunks[-1][: len(part)] = np.concatenate(list(_rows_of(old, self.chunk_rows, part)))
            self.count += len(part)
            for done in range(int(part[-1]) // self.chunk_rows):
                old[done] = None  # copied out: freed before the next chunk is made
        return [np.searchsorted(live, numbers) for numbers in holders]


def _rows_of(chunks: list, chunk_rows: int, numbers: np.ndarray) -> Iterable[np.ndarray]:
    """Increasing ``numbers``' rows from ``chunks``, one array per chunk touched."""
    chunk = numbers // chunk_rows
    for index in np.unique(chunk):
        mine = numbers[chunk == index]
        yield chunks[index][mine - index * chunk_rows]


def memory_limit() -> int:
    """Bytes this process may hold: the machine's memory, or the lowest limit of its control group
    and the groups above it where lower (a container's, a SLURM job's; cgroup v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``, as ``/proc/self/cgroup`` places the process)."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return limit
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        folder = root / group.lstrip("/")
        for where in [folder, *folder.parents]:
            try:
                text = (where / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                limit = min(limit, int(text))
            if where == root:
                break
    return limit


def store_memory_rows(dim: int, share: float = 0.25) -> int:
    """Rows of ``dim`` fp16 features that :class:`NegativeStore` keeps in memory before it spills:
    ``share`` of :func:`memory_limit`. A quarter leaves the rest to a retrain's float32 rows
    (up to ``max_negatives`` of them, twice: its rows and their copies) and to the process."""
    return int(memory_limit() * share) // (2 * dim)


def fit_linear_svm(
    positives: np.ndarray, negatives: np.ndarray, config: SVMConfig, start: tuple[np.ndarray, float] | None = None
) -> tuple[np.ndarray, float]:
    """One class's SVM: ``(P, D)`` positives and ``(N, D)`` negatives -> ``(D,)`` weight and bias.

    ``config.solver`` picks the objective and how it is solved:

    - ``"newton"``: the L2-regularised squared hinge (liblinear ``-s 2 -c C
      -w1 2 -B 10``'s objective) by Newton's method with conjugate gradients
      in torch (:func:`newton_squared_hinge`), started from ``start`` (the
      class's previous model while mining).
    - ``"liblinear"``: R-CNN's own, the hinge's dual (``-s 3``) through
      scikit-learn's LinearSVC; ``start`` is not used (its dual solver cannot start warm).
    """
    if config.solver == "newton":
        return newton_squared_hinge(positives, negatives, config, start)
    if config.solver != "liblinear":
        raise ValueError(f"unknown SVM solver {config.solver!r}: newton or liblinear")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.concatenate([positives, negatives]).astype(np.float32)
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    svm = LinearSVC(
        C=config.C,
        loss="hinge",
        dual=True,
        class_weight={1: config.positive_weight, -1: 1.0},
        intercept_scaling=config.bias_multiplier,
        tol=config.tol,
        max_iter=5000,
        random_state=config.seed,
    )
    with warnings.catch_warnings():
        # One mining round's model need not be fully converged; the last fit is.
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x, y)
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0])


def newton_squared_hinge(
    positives: np.ndarray, negatives: np.ndarray, config: SVMConfig, start: tuple[np.ndarray, float] | None = None
) -> tuple[np.ndarray, float]:
    """Minimise liblinear ``-s 2``'s primal by Newton's method: :func:`solve_squared_hinge` on
    ``(P, D)`` positives and ``(N, D)`` negatives -> ``(D,)`` weight and bias."""
    blocks = [torch.from_numpy(positives), torch.from_numpy(negatives)]
    rows = design_matrix(len(positives) + len(negatives), positives.shape[1], blocks, config.bias_multiplier)
    weight, bias, _ = solve_squared_hinge(rows, len(positives), config, start)
    return weight, bias


class Scratch:
    """A float32 buffer reused from one retrain to the next.

    Why: a retrain's rows are up to 20,000 x 16,001 float32 (1.3 GB at
    ``blocks.6``); a fresh array per retrain is a fresh mapping whose every page
    faults on first touch. On coco128 (468 retrains) that was a quarter of the
    SVM step's CPU time, spent in the kernel.
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def take(self, rows: int, cols: int) -> torch.Tensor:
        """An uninitialised ``(rows, cols)`` view of the buffer, grown (by a quarter more) when too small."""
        if self.buffer.numel() < rows * cols:
            self.buffer = torch.empty(rows * cols * 5 // 4)
        return self.buffer[: rows * cols].view(rows, cols)


def design_matrix(count: int, dim: int, blocks: Iterable[torch.Tensor], bias_multiplier: float,
                  scratch: Scratch | None = None) -> torch.Tensor:
    """Stack ``(n_i, D)`` row blocks (any float dtype; ``sum n_i == count``) into ``(count, D + 1)``
    float32 rows whose last column is the bias feature ``B``; in ``scratch``'s buffer when given.
    The blocks are taken one at a time (a generator need not hold them all)."""
    rows = scratch.take(count, dim + 1) if scratch is not None else torch.empty(count, dim + 1)
    at = 0
    for block in blocks:
        rows[at : at + len(block), :dim] = block  # converted in the copy (fp16 -> float32)
        at += len(block)
    if at != count:
        raise ValueError(f"design_matrix: {at} rows in the blocks, {count} announced")
    rows[:, dim] = bias_multiplier
    return rows


def solve_squared_hinge(
    x: torch.Tensor, positives: int, config: SVMConfig, start: tuple[np.ndarray, float] | None = None,
    scratch: Scratch | None = None, start_scores: torch.Tensor | None = None,
) -> tuple[np.ndarray, float, torch.Tensor]:
    """Minimise liblinear ``-s 2``'s primal by Newton's method (liblinear does the same with a trust region):
    ``0.5 * |w_ext|^2 + sum_i cost_i * max(0, 1 - y_i * x_ext_i . w_ext)^2``, where ``x_ext = (x, B)``
    carries the bias as a feature of value B (so ``b / B`` is regularised like a weight) and
    ``cost`` is C, times the positive weight for positives.

    Args:
        x: ``(P + N, D + 1)`` float32 rows from :func:`design_matrix`, the P positives first.
        positives: P.
        start: the model to start from (the class's previous one while mining).
        scratch: a buffer for the active rows' copies (see :class:`Scratch`).
        start_scores: ``(P + N,)`` the rows' scores under ``start`` where the caller has them
            (the miner: from the last solve and from mining), so that no product over all
            rows computes them again.

    Returns:
        ``(D,)`` weight, bias, and the ``(P + N,)`` scores ``x . w + b`` of the rows, as the
        Newton steps carried them along (each step adds ``t * x . d``): no product over all
        rows either. Each full product saved is about a tenth of a solve (coco128's solves
        make ten or so Newton steps, each with one).

    Why not liblinear itself: scikit-learn hands liblinear its rows as (index,
    double) pairs, 16 bytes per feature, and its solvers run one row at a time;
    here each Newton step is a few matrix-vector products over the float32
    rows (BLAS, all threads). Measured on three saved mining sets (16,000-d,
    540 to 3,247 rows; 2 threads) against the hinge's dual at tolerance 0.1:
    1.6-3.5x faster from the zero model, before any warm start.

    Steps: the generalised Hessian ``I + 2 X_a^T diag(cost_a) X_a`` over the
    rows with a positive margin loss (a), the Newton direction by conjugate
    gradients to a residual of 0.1 |g|, a backtracking line search; stops when
    ``|g| <= config.newton_tol * |g(0)|``, the gradient at the zero model, so
    the answer does not depend on where it started.
    """
    B = config.bias_multiplier
    y = torch.ones(len(x))
    y[positives:] = -1
    cost = torch.where(y > 0, config.C * config.positive_weight, config.C)
    if start is None:
        w = torch.zeros(x.shape[1])
        z = torch.zeros(len(x))
    else:
        w = torch.from_numpy(np.append(start[0], start[1] / B).astype(np.float32))
        z = start_scores if start_scores is not None else x @ w

    def objective(w: torch.Tensor, z: torch.Tensor) -> float:
        loss = torch.clamp(1 - y * z, min=0)
        return 0.5 * _dot(w, w) + _dot(cost * loss, loss)

    # At the zero model every row has loss 1: the gradient is -2 X^T (cost * y).
    g0 = 2 * _transposed_product(x, cost * y)
    stop = config.newton_tol * _dot(g0, g0) ** 0.5
    for _ in range(config.newton_steps):
        loss = torch.clamp(1 - y * z, min=0)
        active = loss > 0
        # The gradient and the Hessian's products touch only the rows with a loss (a): copied
        # once per Newton step unless nearly all rows have one, read in place through masked
        # coefficients then. The copy costs about two products and the step's conjugate gradients
        # make tens: on bccd's largest solve (15,828 rows, 53-60% of them with a loss) copying
        # took it from 49.9 s (rows read in place) to 28.1 s.
        if int(active.sum()) * 10 < len(x) * 9:
            index = torch.nonzero(active).squeeze(1)
            out = scratch.take(len(index), x.shape[1]) if scratch is not None else None
            x_active = torch.index_select(x, 0, index, out=out) if out is not None else x[index]
            g = w - 2 * _transposed_product(x_active, (cost * y * loss)[index])
            curvature = 2 * cost[index]
        else:
            x_active = x
            g = w - 2 * _transposed_product(x, cost * y * loss)
            curvature = 2 * cost * active
        g_norm = _dot(g, g) ** 0.5
        if g_norm <= stop:
            break
        # Conjugate gradients for H d = -g.
        d = torch.zeros_like(w)
        r = -g
        p = r.clone()
        rr = _dot(r, r)
        for _ in range(config.cg_steps):
            hp = p + _transposed_product(x_active, curvature * (x_active @ p))
            step = rr / _dot(p, hp)
            d += step * p
            r -= step * hp
            rr_next = _dot(r, r)
            if rr_next ** 0.5 <= 0.1 * g_norm:
                break
            p = r + (rr_next / rr) * p
            rr = rr_next
        dz = x @ d
        before, slope, t = objective(w, z), _dot(g, d), 1.0
        while objective(w + t * d, z + t * dz) > before + 0.01 * t * slope and t > 1e-6:
            t *= 0.5
        w = w + t * d
        z = z + t * dz
    weight = w[:-1].numpy().astype(np.float32)
    return weight, float(w[-1]) * B, z


# Rows at least this wide take MKL's transposed gemv (x.T @ u): the same bits at 1-16 threads
# for 12,801- to 17,601-d rows (pool5 of blocks.6 and of the Lite1/2 cuts; 32 threads split
# 9,000 rows otherwise), and 2.4x faster than a one-row gemm under strict mode (9,000 x 16,001,
# 2 threads: 20.7 against 49.0 ms; bccd's SVM step 137 -> 220 s). Narrower rows (1,025-d fc7,
# 5,601-d pool5 of blocks.4), where the transposed gemv split its sum by thread from 2-3
# threads on (5,601-d at 16), take the one-row gemm, which strict mode covers; they are cheap.
WIDE_ROWS = 8192


def _transposed_product(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x' u`` for ``(N, D)`` rows and ``(N,)`` ``u``, the same bits at any thread count
    this project measured (see :data:`WIDE_ROWS`)."""
    return x.T @ u if x.shape[1] >= WIDE_ROWS else u @ x


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a . b`` of two CPU vectors, summed in float64 by numpy's pairwise sum, one thread.

    The solver's arithmetic gives the same bits at any thread count, so that ``--threads``
    and torchrun's ranks train the same SVMs: torch's ``dot`` (MKL's) and its sums over
    more than 32,768 elements split the sum by thread, and mining amplified those last bits
    into SVM biases 3% apart (coco128: 1 thread against 2). The products over the rows are
    ``x @ v`` and :func:`_transposed_product`.
    """
    return float((a.numpy().astype(np.float64) * b.numpy().astype(np.float64)).sum())


class HardNegativeMiner:
    """Runs the mining epoch; feed it images one by one, then :meth:`finish`.

    Args:
        classes: K class names.
        dim: D, feature length.
        config: the protocol's settings.
        on_retrain: called with ``(class name, positives, negatives)`` after each retrain.
        spill, memory_rows: where the hard negatives' store puts rows past its first
            ``memory_rows`` (see :class:`NegativeStore`); ``None``: all in memory.
    """

    def __init__(self, classes: list[str], dim: int, config: SVMConfig, on_retrain: Callable[[str, int, int], None] | None = None,
                 spill: Path | None = None, memory_rows: int | None = None):
        self.classes = list(classes)
        self.dim = dim
        self.config = config
        self.on_retrain = on_retrain
        self.state = {name: _ClassState() for name in classes}
        self._index = {name: k for k, name in enumerate(self.classes)}
        self.store = NegativeStore(dim, spill=spill, memory_rows=memory_rows)
        self._rows, self._active_rows = Scratch(), Scratch()  # a retrain's rows, and its active rows' copies

    def add_positives(self, class_name: str, features: np.ndarray) -> None:
        """``(P, D)`` scaled features of ground-truth boxes of one class."""
        if len(features):
            self.state[class_name].positives.append(features.astype(np.float16))

    def _weights(self) -> tuple[np.ndarray, np.ndarray]:
        w = np.zeros((len(self.classes), self.dim), np.float32)
        b = np.zeros(len(self.classes), np.float32)
        for k, name in enumerate(self.classes):
            st = self.state[name]
            if st.weight is not None:
                w[k], b[k] = st.weight, st.bias
        return w, b

    def add_image(self, features: torch.Tensor, candidates: dict[str, np.ndarray]) -> None:
        """Mine one image (each image once: one epoch, so no window is cached twice).

        Args:
            features: ``(R, D)`` scaled features of its distinct windows.
            candidates: per class, indices into ``features`` of windows that
                qualify as negatives (IoU < 0.3 with all its ground truths).
        """
        w, b = self._weights()
        scores = (features @ torch.from_numpy(w).T + torch.from_numpy(b)).numpy()
        hard_of = {}
        for k, name in enumerate(self.classes):
            idx = candidates.get(name)
            if idx is None or len(idx) == 0 or not self.state[name].positives:
                continue
            hard = idx[scores[idx, k] > self.config.hard_threshold]
            if len(hard):
                hard_of[name] = hard
        if not hard_of:
            return
        # Each hard window once in the store, whatever number of classes found it hard.
        windows = np.unique(np.concatenate(list(hard_of.values())))
        numbers = np.zeros(len(features), np.int64)
        numbers[windows] = self.store.add(features[torch.from_numpy(windows)].half().numpy())
        for name, hard in hard_of.items():
            st = self.state[name]
            st.negatives = np.concatenate([st.negatives, numbers[hard]])
            st.new_since_retrain += len(hard)
            if st.scores is not None:  # the new rows' scores under the class's model: its next solve starts there
                st.scores = np.concatenate([st.scores, scores[hard, self._index[name]]])
        # Retrains after all classes took their rows: a retrain may renumber the store.
        for name in hard_of:
            if self.state[name].new_since_retrain >= self.config.retrain_every:
                self._retrain(name)

    def _retrain(self, name: str) -> None:
        # One class at a time: the Newton solver's products use all threads, and scikit-learn's
        # liblinear draws its coordinate order from one generator shared by all threads (side-by-side
        # fits would not be reproducible).
        st = self.state[name]
        start = (st.weight, st.bias) if st.weight is not None else None
        if self.config.solver == "newton":
            # The rows go straight from the fp16 store into the reused float32 buffer (no float32 copy
            # in numpy: its fp16 conversion alone was a quarter of coco128's SVM step).
            positive_count = sum(len(rows) for rows in st.positives)
            blocks = itertools.chain(st.positives, self.store.blocks(st.negatives))
            blocks = (torch.from_numpy(rows) for rows in blocks)
            x = design_matrix(positive_count + len(st.negatives), self.dim, blocks, self.config.bias_multiplier, self._rows)
            start_scores = torch.from_numpy(st.scores) if start is not None and st.scores is not None else None
            st.weight, st.bias, scores = solve_squared_hinge(x, positive_count, self.config, start, self._active_rows, start_scores)
            scores = scores.numpy()
            neg_scores = scores[positive_count:]
        else:
            positives = np.concatenate(st.positives).astype(np.float32)
            negatives = self.store.take(st.negatives).astype(np.float32)
            st.weight, st.bias = fit_linear_svm(positives, negatives, self.config, start)
            positive_count = len(positives)
            neg_scores = negatives @ st.weight + st.bias
        st.retrains += 1
        st.new_since_retrain = 0
        # Evict easy negatives; keep the cache bounded, hardest first.
        keep = np.flatnonzero(neg_scores >= self.config.evict_threshold)
        if len(keep) > self.config.max_negatives:
            keep = keep[np.argsort(-neg_scores[keep], kind="stable")[: self.config.max_negatives]]
            keep.sort()
        st.negatives = st.negatives[keep]
        if self.config.solver == "newton":
            st.scores = np.concatenate([scores[:positive_count], neg_scores[keep]])
        # Evicted rows that no class holds any more: dropped once they are half the store.
        holders = [state.negatives for state in self.state.values()]
        live = np.count_nonzero(np.bincount(np.concatenate(holders), minlength=self.store.count))  # unique's sort: 4 s on coco128
        if 2 * live < self.store.count:
            for state, numbers in zip(self.state.values(), self.store.compact(holders)):
                state.negatives = numbers
        if self.on_retrain:
            self.on_retrain(name, positive_count, len(keep))

    def finish(self, feature_scale: float) -> LinearSVMs:
        """Final retrain of every class with new negatives, and the classifiers."""
        for name in self.classes:
            st = self.state[name]
            if st.positives and len(st.negatives) and (st.new_since_retrain or st.weight is None):
                self._retrain(name)
        w, b = self._weights()
        return LinearSVMs(self.classes, w, b, feature_scale)

    def export_state(self) -> tuple[dict[str, np.ndarray | StreamedTensor], list[dict]]:
        """The state mining has built (not the positives: they come before mining, from the
        same cache): tensors for :func:`~spp_cli.fileio.atomic_write_safetensors` (the store's
        rows each class still holds, streamed from the store, and per class ``k`` its rows'
        numbers ``negatives.k``, model ``weight.k`` and solver ``scores.k``) and per class
        its bias and counters. :meth:`import_state` takes them back; the rows keep their order,
        so the retrains that follow solve the same problems as they would have without the stop."""
        holders = [self.state[name].negatives for name in self.classes]
        live = np.unique(np.concatenate(holders)) if holders else np.zeros(0, np.int64)
        tensors: dict[str, np.ndarray | StreamedTensor] = {
            "store": StreamedTensor(np.dtype(np.float16), (len(live), self.dim), lambda: self.store.blocks(live, 4096)),
        }
        counters = []
        for k, name in enumerate(self.classes):
            st = self.state[name]
            tensors[f"negatives.{k}"] = np.searchsorted(live, st.negatives).astype(np.int64)
            if st.weight is not None:
                tensors[f"weight.{k}"] = st.weight
            if st.scores is not None:
                tensors[f"scores.{k}"] = st.scores
            counters.append({"bias": st.bias, "retrains": st.retrains, "new_since_retrain": st.new_since_retrain})
        return tensors, counters

    def import_state(self, read: Callable[[str], np.ndarray | None], store_rows: Iterable[np.ndarray], counters: list[dict]) -> None:
        """Take back what :meth:`export_state` gave, into a miner that holds its positives
        and nothing mined yet: ``read(name)`` gives a tensor (None where it was not written),
        ``store_rows`` the store's rows in blocks.

        Raises:
            ValueError: the parts do not fit together or with this miner's positives (a file
                written for other data); the miner then holds part of it (see :meth:`forget_mining`).
        """
        for rows in store_rows:
            if rows.shape[1:] != (self.dim,):
                raise ValueError(f"store rows of {rows.shape[1:]} values, not ({self.dim},)")
            self.store.add(rows)
        if len(counters) != len(self.classes):
            raise ValueError(f"{len(counters)} classes' counters for {len(self.classes)} classes")
        for k, name in enumerate(self.classes):
            st = self.state[name]
            st.negatives = read(f"negatives.{k}")
            st.weight, st.scores = read(f"weight.{k}"), read(f"scores.{k}")
            st.bias, st.retrains, st.new_since_retrain = counters[k]["bias"], counters[k]["retrains"], counters[k]["new_since_retrain"]
            positives = sum(len(rows) for rows in st.positives)
            if st.negatives is None or (len(st.negatives) and not 0 <= st.negatives.min() <= st.negatives.max() < self.store.count):
                raise ValueError(f"class {name}: negatives missing or outside the store")
            if st.scores is not None and len(st.scores) != positives + len(st.negatives):
                raise ValueError(f"class {name}: {len(st.scores)} row scores for {positives} positives and {len(st.negatives)} negatives")

    def forget_mining(self) -> None:
        """Back to the state before mining: the positives only."""
        self.store = NegativeStore(self.dim, spill=self.store.spill, memory_rows=self.store.memory_rows)
        self.state = {name: _ClassState(positives=self.state[name].positives) for name in self.classes}

    def untrained(self) -> list[str]:
        """Classes without positives (no classifier can be trained)."""
        return [name for name in self.classes if not self.state[name].positives]


def negative_candidates(proposals: np.ndarray, gt_boxes: np.ndarray, gt_classes: list[str], classes: list[str], max_iou: float) -> dict[str, np.ndarray]:
    """Per class, indices of proposals under ``max_iou`` with every ground truth of that class.

    Ground truths include difficult and crowd boxes: a window over one is not
    a clean negative, even though such boxes are not positives either.
    """
    out = {}
    overlaps = box_ops.iou(proposals, gt_boxes).numpy() if len(gt_boxes) and len(proposals) else None
    names = np.asarray(gt_classes)
    for name in classes:
        if overlaps is None or not (names == name).any():
            out[name] = np.arange(len(proposals))
        else:
            out[name] = np.flatnonzero(overlaps[:, names == name].max(axis=1) < max_iou)
    return out
