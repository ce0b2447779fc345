"""``SparseMLP``: a stack of :class:`SparseLinear` layers with hidden activations and softmax output.

Samples enter as ``x`` of shape ``(B, n_features)``; internally every activation is
feature-major ``(width, B)`` (see :mod:`hpc_sparse.sparse.kernels_layout`). Buffers for a
batch size are allocated once and reused across steps; only a change of widths (importance
pruning) or of batch size allocates again. Each layer's cache
blocking plan (:mod:`hpc_sparse.sparse.blocking`) is recomputed at every forward pass from
the layer's current shape and nnz, so it never depends on when the buffers were made.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numba
import numpy as np

from hpc_sparse.sparse import activations as act
from hpc_sparse.sparse import kernels_backward as kb
from hpc_sparse.sparse import kernels_forward as kf
from hpc_sparse.sparse.blocking import LayerPlan, last_level_cache_bytes, plan_layer
from hpc_sparse.sparse.buffers import Buffers
from hpc_sparse.sparse.kernels_elementwise import ACTIVATION_DTYPES, as_float32, to_bfloat16
from hpc_sparse.sparse.kernels_layout import transpose_into
from hpc_sparse.sparse.linear import SparseLinear
from hpc_sparse.sparse.loss import softmax_xent
from hpc_sparse.sparse.optim import SGD
from hpc_sparse.sparse.profile import PhaseTimer

_NO_SCRATCH = np.empty(0, np.float32)


@dataclass
class StepResult:
    """Summed loss and number correct over one batch (sums, so they reduce exactly across ranks)."""

    loss_sum: float
    correct: int
    count: int


class SparseMLP:
    """Truly sparse multilayer perceptron.

    Parameters
    ----------
    layers : list of SparseLinear
        ``layers[l].weight`` has shape ``(widths[l], widths[l+1])``.
    activations : list of Activation
        One per hidden layer (``len(layers) - 1``).
    dropout : float
        Inverted-dropout rate on hidden outputs during training.
    activation_dtype : str
        ``"float32"`` or ``"bfloat16"``: how activations, pre-activations and deltas are stored
        between kernels (:mod:`kernels_elementwise`); weights, momentum and biases are float32
        either way, and every product and sum is accumulated in float32.
    """

    def __init__(self, layers: list[SparseLinear], activations: list[act.Activation], dropout: float = 0.0,
                 activation_dtype: str = "float32") -> None:
        if len(activations) != len(layers) - 1:
            raise ValueError(f"{len(layers)} layers need {len(layers) - 1} hidden activations")
        self.layers = layers
        self.activations = activations
        self.dropout = float(dropout)
        self._buffers: dict[int, Buffers] = {}
        self.activation_dtype = "float32"
        self.set_activation_dtype(activation_dtype)
        self._last_train_batch = 0
        self._blocking = (0, 0, 0)  # batch_chunk, block_columns, cache_bytes (0 = automatic)
        self.profile: PhaseTimer | None = None
        """Attach a :class:`PhaseTimer` to record the wall time of every phase of a step."""
        self.check_shapes()

    # ----------------------------------------------------------------- structure
    @property
    def widths(self) -> tuple[int, ...]:
        """Layer sizes, input first: ``(n_features, hidden..., n_classes)``; hidden widths
        shrink under importance pruning."""
        return (self.layers[0].shape[0],) + tuple(l.shape[1] for l in self.layers)

    @property
    def nnz(self) -> int:
        """Stored connections of all layers together."""
        return sum(l.nnz for l in self.layers)

    @property
    def hidden_neurons(self) -> int:
        """Neurons of all hidden layers together."""
        return sum(self.widths[1:-1])

    def check_shapes(self) -> None:
        for l, (a, b) in enumerate(zip(self.layers[:-1], self.layers[1:])):
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"layer {l} outputs {a.shape[1]} but layer {l + 1} takes {b.shape[0]}")

    def topology_changed(self) -> None:
        """Drop cached buffers after widths changed (importance pruning)."""
        self._buffers.clear()

    def set_activation_dtype(self, name: str) -> None:
        """Store activations and deltas as ``"float32"`` or ``"bfloat16"`` from the next step on."""
        if name not in ACTIVATION_DTYPES:
            raise ValueError(f"activation dtype {name!r} is not one of {sorted(ACTIVATION_DTYPES)}")
        if name != self.activation_dtype:
            self._buffers.clear()
        self.activation_dtype = name

    def configure_blocking(self, batch_chunk: int = 0, block_columns: int = 0, cache_bytes: int = 0) -> None:
        """Override the automatic cache blocking (:func:`blocking.plan_layer`); 0 keeps a setting
        automatic. ``cache_bytes`` replaces the last-level cache size read from the machine."""
        self._blocking = (int(batch_chunk), int(block_columns), int(cache_bytes))

    def blocking_plans(self, batch: int) -> list[LayerPlan]:
        """Each layer's cache blocking at ``batch`` samples."""
        chunk, cols, cache = self._blocking
        cache = cache or last_level_cache_bytes()
        elem = np.dtype(ACTIVATION_DTYPES[self.activation_dtype]).itemsize
        last = len(self.layers) - 1
        return [plan_layer(l.shape[0], l.shape[1], l.nnz, batch, cache, chunk, cols, elem, k == 0, k == last)
                for k, l in enumerate(self.layers)]

    def _bufs(self, batch: int) -> Buffers:
        buf = self._buffers.get(batch)
        if buf is None or buf.widths != self.widths:
            # keep at most the training and the evaluation batch sizes alive
            if len(self._buffers) >= 3:
                self._buffers.clear()
            buf = self._buffers[batch] = Buffers(batch, self.widths, ACTIVATION_DTYPES[self.activation_dtype],
                                                 tuple(f.kind for f in self.activations))
        return buf

    # ------------------------------------------------------------------- compute
    def _forward(self, x: np.ndarray, buf: Buffers, dropout_key: np.uint64 | None) -> np.ndarray:
        """Run the network on x (B, n_in); returns the logits buffer (C, B)."""
        prof = self.profile
        t0 = time.perf_counter() if prof is not None else 0.0
        if buf.x.dtype != np.float32 or (x.size >= 1 << 18 and x.dtype == np.float32 and x.flags.c_contiguous):
            transpose_into(np.ascontiguousarray(x, np.float32), buf.x)  # blocked; numpy's strided copy is slow
        else:
            np.copyto(buf.x, x.T)
        if prof is not None:
            t0 = prof.lap("input", t0)
        a_prev = buf.x
        p = self.dropout if dropout_key is not None else 0.0
        threshold = np.uint64(int(p * 2.0 ** 32))
        scale = np.float32(1.0 / (1.0 - p))
        threads = numba.get_num_threads()
        last = len(self.layers) - 1
        buf.plans = self.blocking_plans(buf.batch)  # the backward pass of this step uses them too
        buf.keys = []
        for l, layer in enumerate(self.layers):
            plan = buf.plans[l]
            bounds, seg = layer.part_index(plan.forward_blocks, threads)
            w = layer.weight
            if l == last:
                kf.forward_linear(seg, bounds, plan.forward_blocks, w.indices, w.data, a_prev, layer.bias, plan.chunk,
                                  buf.logits)
            else:
                f = self.activations[l]
                key = (np.uint64((int(dropout_key) + l * 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
                       if p > 0 else np.uint64(0))
                buf.keys.append(key)
                block_rows = int(np.diff(bounds[::threads]).max())
                acc = buf.scratch("acc", block_rows, plan.chunk)
                kf.forward_act(seg, bounds, plan.forward_blocks, w.indices, w.data, a_prev, layer.bias, plan.chunk, acc,
                               f.kind, np.float32(f.slope), threshold, scale, key, buf.a[l], buf.zinfo[l])
                a_prev = buf.a[l]
            if prof is not None:
                t0 = prof.lap(f"forward[{l}]", t0)
        return buf.logits

    def _backward(self, buf: Buffers, use_dropout: bool, sgd: SGD | None,
                  grads: list[np.ndarray] | None) -> None:
        """Back-propagate ``buf.delta[-1]``. With ``sgd`` the fused SDDMM+momentum update is
        applied to every layer; otherwise the weight gradients go into ``grads``."""
        prof = self.profile
        t0 = time.perf_counter() if prof is not None else 0.0
        scale = np.float32(1.0 / (1.0 - self.dropout)) if use_dropout else np.float32(1.0)
        threshold = np.uint64(int(self.dropout * 2.0 ** 32)) if use_dropout else np.uint64(0)
        threads = numba.get_num_threads()
        top = len(self.layers) - 1
        kb.row_sums(buf.dlogits, buf.gbias[top])
        if buf.delta[top] is not buf.dlogits:
            buf.delta[top][...] = to_bfloat16(buf.dlogits)
        if sgd is not None:
            lr, mu, dec = np.float32(sgd.lr), np.float32(sgd.momentum), np.float32(sgd.weight_decay)
        for l in range(top, -1, -1):
            layer = self.layers[l]
            w = layer.weight
            plan = buf.plans[l]
            _, seg = layer.part_index(plan.n_blocks, threads)
            a_prev = buf.a[l - 1] if l > 0 else buf.x
            if l > 0:
                f = self.activations[l - 1]
                out = buf.delta[l - 1]
                # the sums over column blocks are accumulated in float32: in out itself, or in scratch
                acc = out if out.dtype == np.float32 else buf.scratch("acc", out.shape[0], plan.chunk)
                act_args = (buf.zinfo[l - 1], f.kind, np.float32(f.slope), scale,
                            buf.keys[l - 1] if use_dropout else np.uint64(0), threshold)
            if sgd is not None:
                # Nesterov needs the whole gradient before stepping: with a chunked batch it is
                # collected in a scratch vector (4 bytes per weight, for this call only)
                scratch = (np.empty(layer.nnz, np.float32) if sgd.nesterov and plan.chunk < buf.batch
                           else _NO_SCRATCH)
                if l > 0:
                    kb.backward_act_sgd(seg, plan.n_blocks, w.indices, w.data, layer.w_velocity, scratch,
                                        buf.delta[l], a_prev, *act_args, lr, mu, dec, sgd.nesterov, plan.chunk, acc,
                                        out, buf.gbias[l - 1])
                else:
                    kb.sddmm_sgd(seg, plan.n_blocks, w.indices, w.data, layer.w_velocity, scratch, buf.delta[0],
                                 a_prev, lr, mu, dec, sgd.nesterov, plan.chunk)
                if prof is not None:
                    t0 = prof.lap(f"backward[{l}]", t0)
                kb.dense_sgd_update(buf.gbias[l], layer.bias, layer.b_velocity, lr, mu, dec, sgd.nesterov)
                if prof is not None:
                    t0 = prof.lap("bias_update", t0)
            else:
                assert grads is not None
                if l > 0:
                    kb.backward_act_grad(seg, plan.n_blocks, w.indices, w.data, grads[l], buf.delta[l], a_prev,
                                         *act_args, plan.chunk, acc, out, buf.gbias[l - 1])
                else:
                    kb.sddmm_grad(seg, plan.n_blocks, w.indices, w.data, grads[0], buf.delta[0], a_prev, plan.chunk)
                if prof is not None:
                    t0 = prof.lap(f"backward[{l}]", t0)

    def _forward_loss(self, x: np.ndarray, y: np.ndarray, dropout_key: np.uint64 | None
                      ) -> tuple[Buffers, bool]:
        """Forward pass and softmax cross-entropy of a training batch; the buffers then hold
        everything :meth:`_backward` and RigL (:meth:`last_batch`) need."""
        buf = self._bufs(x.shape[0])
        self._last_train_batch = x.shape[0]
        use_dropout = dropout_key is not None and self.dropout > 0
        logits = self._forward(x, buf, dropout_key if use_dropout else None)
        t0 = time.perf_counter() if self.profile is not None else 0.0
        softmax_xent(logits, y, buf.dlogits, buf.losses, buf.correct)
        if self.profile is not None:
            self.profile.lap("loss", t0)
        return buf, use_dropout

    def train_step(self, x: np.ndarray, y: np.ndarray, sgd: SGD, dropout_key: np.uint64 | None) -> StepResult:
        """One SGD step on the batch x (B, n_in) float32, y (B,) int; updates weights in place.

        ``dropout_key`` (see :func:`~hpc_sparse.sparse.activations.dropout_key`) seeds this step's dropout
        masks; ``None`` disables dropout. Returns the batch's summed loss and hits.
        """
        buf, use_dropout = self._forward_loss(x, y, dropout_key)
        self._backward(buf, use_dropout, sgd, None)
        return StepResult(float(buf.losses.sum()), int(buf.correct.sum()), x.shape[0])

    def gradients(self, x: np.ndarray, y: np.ndarray, dropout_key: np.uint64 | None = None
                  ) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        """Mean loss and its gradients without updating: (loss, [dW data (nnz,)], [db (n_out,)])."""
        buf, use_dropout = self._forward_loss(x, y, dropout_key)
        grads = [np.empty(l.nnz, np.float32) for l in self.layers]
        self._backward(buf, use_dropout, None, grads)
        return float(buf.losses.mean()), grads, [g.copy() for g in buf.gbias]

    def last_batch(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """Inputs (width_l, B) and output deltas (width_{l+1}, B) of every layer from the most
        recent training step, float32 (widened copies when stored as bfloat16), or None if
        there is none; RigL scores missing connections from them. Note: ``delta`` of layer l
        is the gradient w.r.t. its pre-activation."""
        buf = self._buffers.get(self._last_train_batch)
        if buf is None or buf.widths != self.widths:
            return None
        return [as_float32(a) for a in [buf.x] + buf.a], [as_float32(d) for d in buf.delta[:-1]] + [buf.dlogits]

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (B, C) for x (B, n_in), without dropout. Returns a copy."""
        buf = self._bufs(x.shape[0])
        return self._forward(x, buf, None).T.copy()

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> StepResult:
        """Summed cross-entropy and hits over (x, y), in batches, without dropout."""
        loss, hits = 0.0, 0
        for lo in range(0, x.shape[0], batch_size):
            xb, yb = x[lo:lo + batch_size], y[lo:lo + batch_size]
            buf = self._bufs(xb.shape[0])
            logits = self._forward(xb, buf, None)
            softmax_xent(logits, yb, buf.dlogits, buf.losses, buf.correct)
            loss += float(buf.losses.sum())
            hits += int(buf.correct.sum())
        return StepResult(loss, hits, int(x.shape[0]))

    def sha256(self) -> str:
        """SHA-256 over every layer's canonical bytes in layer order (see SparseLinear.fingerprint)."""
        h = hashlib.sha256()
        for layer in self.layers:
            layer.fingerprint(h)
        return h.hexdigest()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, object]:
        """Arrays that define the model and its optimizer state (no copies of CSR data):
        ``layers/<l>/W`` (csr), ``W_velocity`` (nnz,), ``b`` (n_out,), ``b_velocity``."""
        out: dict[str, object] = {}
        for l, layer in enumerate(self.layers):
            out[f"layers/{l}/W"] = layer.weight
            out[f"layers/{l}/W_velocity"] = layer.w_velocity
            out[f"layers/{l}/b"] = layer.bias
            out[f"layers/{l}/b_velocity"] = layer.b_velocity
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, object], activations: list[act.Activation],
                        dropout: float) -> "SparseMLP":
        """Rebuild a model from :meth:`state_dict` output (e.g. a loaded checkpoint)."""
        n_layers = len([k for k in state if k.endswith("/W") and k.startswith("layers/")])
        layers = [SparseLinear(state[f"layers/{l}/W"], state[f"layers/{l}/b"],  # type: ignore[arg-type]
                               state[f"layers/{l}/W_velocity"], state[f"layers/{l}/b_velocity"])  # type: ignore[arg-type]
                  for l in range(n_layers)]
        return cls(layers, activations, dropout)

    def parameter_arrays(self) -> list[np.ndarray]:
        """The float32 arrays replicas average: per layer W.data, W momentum, b, b momentum."""
        out = []
        for layer in self.layers:
            out += [layer.weight.data, layer.w_velocity, layer.bias, layer.b_velocity]
        return out

    def topology_arrays(self) -> tuple[list[np.ndarray], list[str]]:
        """Index arrays that must agree across ranks, with their names."""
        arrays, names = [], []
        for l, layer in enumerate(self.layers):
            arrays += [layer.weight.indptr, layer.weight.indices]
            names += [f"layers/{l}/W.indptr", f"layers/{l}/W.indices"]
        return arrays, names
