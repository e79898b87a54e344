"""The win-probability head: RouteLLM's matrix-factorization router generalized to N models.

Each model m has a learned vector v_m; the prompt embedding x is projected into the
same space, and the model's ability on this prompt is the logit

    s_m(x) = (x P) . v_m + b_m                      # P: (dim, rank), v_m: (rank,)

(optionally plus x . a_m, a per-model full-rank vector with its own ridge penalty).

With `hidden` > 0, x is first widened by one ReLU layer, x' = [x, relu(x W1 + c1)] (a skip
connection: the linear head is the special case W1 = 0), and everything above reads x'.

With `lexical_l2` set, every output also adds phi(x) . l_o, where phi(x) are the prompt's
lexical features (router.lexical: binary tf-idf over its word pieces and adjacent pairs, sparse)
and l_o one weight per feature for each model's ability and for the difficulty bar.

Bradley-Terry: P(m's answer beats m''s) = sigmoid(s_m - s_m'). The outcomes in the
data compare a model's answer with something else, so each data set adds its term:

    correctness (MMLU):           P(correct)        = sigmoid(s_m(x) - d(x))
    judged vs a reference (Alpaca): P(beats ref)    = sigmoid(s_m(x) - s_ref(x) + c_data)

d(x) = x . w_d + b_d is the prompt's difficulty bar, s_ref the reference model's own
ability (gpt-4-1106-preview, also MMLU's strong model, which ties the files together)
and c_data a per-file judge offset. Serving reads quality = sigmoid(s_m - d) and
win probability = sigmoid(s_t - s_cheapest), calibrated per pair, and for a head with a
closed-form/open-ended gate mixed from two calibrations by it (router.scoring.win_rate;
training.fit.calibrate_win fits both and the gate). Fitted on judged-vs-reference
terms alone (no correctness data set), s_ref is held at 0 and d(x) at 0, so that quality reads
P(beats the reference): otherwise absolute abilities are not identified (see `fit`).
Because the final map is linear, the trained head collapses to one matrix (over x') for export,
plus the (features, M + 1) lexical weights, which head.onnx gathers by feature index.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from router.lexical import Lexicon, Tokens, lexical_logits
from router.scoring import LENGTH_FEATURES

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Terms:
    """Outcome terms in long form (see training.data.RoutingData)."""

    row: npt.NDArray[np.int64]  # (K,) prompt row of each term
    model: npt.NDArray[np.int64]  # (K,) model index
    dataset: npt.NDArray[np.int64]  # (K,) data set index
    target: F32  # (K,) outcome in [0, 1]
    compare: tuple[str, ...]  # per data set: "bar" or "reference"
    reference: int  # model index of the reference in "reference" data sets
    n_models: int
    weight: F32 | None = None  # (K,) per-term weight on top of the data set's (None: 1.0 each)

    def subset(self, keep: npt.NDArray[np.bool_]) -> Terms:
        return Terms(
            self.row[keep],
            self.model[keep],
            self.dataset[keep],
            self.target[keep],
            self.compare,
            self.reference,
            self.n_models,
            None if self.weight is None else self.weight[keep],
        )


@dataclass
class HeadConfig:
    """The head's hyperparameters, shared by fit and evaluate (chosen in docs/evaluation.md)."""

    rank: int = 32  # 32, 64 and 384 gave the same 5-fold APGR
    l2: float = 1e-3  # ridge on the MF factors; 5e-4 and 2e-3 were worse
    steps: int = 300  # L-BFGS iterations (Adam: steps)
    lr: float = 0.01  # Adam only
    seed: int = 0
    optimizer: str = "lbfgs"  # full-batch L-BFGS converges; "adam" is kept for comparison
    l2_direct: float | None = 3e-4  # per-model full-rank weights beside the MF part (None: off)
    reference_weight: float = 0.5  # weight of an AlpacaEval term relative to an MMLU term
    hidden: int = 256  # width of the ReLU layer in front of the MF head (0: the linear head; docs/evaluation.md)
    l2_hidden: float = 1e-3  # ridge on that layer's weights
    # ridge on each output's weights over the prompt's word pieces and their pairs (router.lexical);
    # None: no lexical features. 3e-5 / 1e-4 / 3e-4 gave 0.688 / 0.694 / 0.691 MMLU APGR (docs/evaluation.md)
    lexical_l2: float | None = 1e-4
    lexical_min_df: int = 5  # a lexical feature is kept if at least this many training prompts have it
    # fit on the embedding standardized per dimension (training rows' mean and std, times
    # sqrt(dim) so the whole vector keeps about unit norm), folded back into the exported weights.
    # Off: MMLU APGR 0.694 -> 0.695 on the shipped encoder, 0.698 -> 0.701 on MiniLM's first 3
    # layers, but worse across data sets (docs/evaluation.md, "Sixth round")
    standardize: bool = False

    def make_head(self) -> WinRateHead:
        return WinRateHead(**{k: getattr(self, k) for k in HEAD_FIELDS})


HEAD_FIELDS = tuple(asdict(HeadConfig()))


def lexical_matrix(lexicon: Lexicon, tokens: Tokens) -> Any:
    """Every row's lexical features as a sparse (N, F) torch matrix."""
    import torch

    index, value = lexicon.features(tokens.input_ids, tokens.lengths)
    keep = index < lexicon.size
    rows = np.broadcast_to(np.arange(len(index))[:, None], index.shape)[keep]
    coo = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, index[keep]])),
        torch.from_numpy(value[keep]),
        (len(index), lexicon.size),
        check_invariants=True,
    )
    return coo.coalesce()


class WinRateHead:
    """scikit-learn estimator shape: hyperparameters in __init__, learned state ends in `_`."""

    def __init__(
        self,
        rank: int = HeadConfig.rank,
        l2: float = HeadConfig.l2,
        steps: int = HeadConfig.steps,
        lr: float = HeadConfig.lr,
        seed: int = HeadConfig.seed,
        optimizer: str = HeadConfig.optimizer,
        l2_direct: float | None = HeadConfig.l2_direct,
        reference_weight: float = HeadConfig.reference_weight,
        hidden: int = HeadConfig.hidden,
        l2_hidden: float = HeadConfig.l2_hidden,
        lexical_l2: float | None = HeadConfig.lexical_l2,
        lexical_min_df: int = HeadConfig.lexical_min_df,
        standardize: bool = HeadConfig.standardize,
    ) -> None:
        # Defaults are HeadConfig's (the shipped choice), kept in one place.
        self.rank = rank
        self.l2 = l2
        # With l2_direct set, each model also gets a full-rank weight vector a_m (its own
        # logistic regression, ridge-penalized by l2_direct) beside the shared low-rank part.
        self.l2_direct = l2_direct
        # Weight of a judged-vs-reference term relative to a correctness term: the AlpacaEval
        # terms help place models but pull the shared vectors away from MMLU's signal.
        self.reference_weight = reference_weight
        self.hidden = hidden
        self.l2_hidden = l2_hidden
        # With lexical_l2 set, every output (each model's ability, the difficulty bar) also gets
        # a weight per lexical feature (router.lexical: word pieces and pairs of them, binary
        # tf-idf), ridge-penalized by lexical_l2; the lexicon is fitted on the training rows.
        self.lexical_l2 = lexical_l2
        self.lexical_min_df = lexical_min_df
        self.standardize = standardize
        self.steps = steps
        self.lr = lr
        self.seed = seed
        self.optimizer = optimizer  # "adam" (steps x lr) or "lbfgs" (steps = max iterations)

    def fit(self, X: F32, terms: Terms, tokens: Tokens | None = None) -> WinRateHead:
        """`tokens`: every row's word pieces (router.tokenizer), needed with lexical_l2."""
        import torch

        torch.manual_seed(self.seed)
        train_rows = np.unique(terms.row)
        shift, scale = self._standardization(X, train_rows)
        x = torch.from_numpy(np.ascontiguousarray((X - shift) / scale if self.standardize else X, np.float32))
        n_in, n_models, n_data = x.shape[1], terms.n_models, len(terms.compare)
        dim = n_in + self.hidden  # width of x' (see the module docstring)
        row = torch.from_numpy(terms.row)
        model = torch.from_numpy(terms.model)
        dset = torch.from_numpy(terms.dataset)
        y = torch.from_numpy(terms.target)
        is_bar = torch.tensor([c == "bar" for c in terms.compare])[dset]  # (K,)
        weight = torch.where(is_bar, 1.0, self.reference_weight)
        if terms.weight is not None:
            weight = weight * torch.from_numpy(np.asarray(terms.weight, np.float32))
        weight = weight / weight.mean()

        # 1. parameters (RouteLLM's MF: projection P, model vectors V, biases; W1, c1 the hidden layer)
        P = torch.nn.Parameter(torch.randn(dim, self.rank) / dim**0.5)
        V = torch.nn.Parameter(torch.randn(n_models, self.rank) * 0.1)
        b = torch.nn.Parameter(torch.zeros(n_models))
        wd = torch.nn.Parameter(torch.zeros(dim))
        bd = torch.nn.Parameter(torch.zeros(()))
        offset = torch.nn.Parameter(torch.zeros(n_data))
        A = torch.nn.Parameter(torch.zeros(dim, n_models))
        W1 = torch.nn.Parameter(torch.randn(n_in, self.hidden) * (2.0 / n_in) ** 0.5)
        c1 = torch.nn.Parameter(torch.zeros(self.hidden))
        params = [P, V, b, wd, bd, offset] + ([A] if self.l2_direct is not None else [])
        params += [W1, c1] if self.hidden else []
        l2_direct = self.l2_direct or 0.0
        lexicon, phi, L = None, None, None
        if self.lexical_l2 is not None:
            if tokens is None:
                raise ValueError("a head with lexical_l2 needs the prompts' tokens")
            lexicon = Lexicon.fit(tokens.input_ids[train_rows], tokens.lengths[train_rows], tokens.vocab,
                                  self.lexical_min_df)
            phi = lexical_matrix(lexicon, tokens)  # (N, F) sparse
            L = torch.nn.Parameter(torch.zeros(lexicon.size, n_models + 1))
            params.append(L)

        # Judged-vs-reference terms only see s_m - s_ref: adding any f(x) to every model's ability
        # leaves their likelihood unchanged, so without a correctness ("bar") term the absolute
        # abilities, and the quality read from them, are fixed only by the ridge, whose slight
        # curvature L-BFGS barely follows from the seed's starting point (trained on AlpacaEval
        # alone, MMLU's floor ranking was 0.550 / 0.487 / 0.610 for seeds 0 / 1 / 2). So then the
        # reference is the yardstick: its ability is held at 0, every other model's is its margin
        # over the reference, and the untrained bar stays at 0, so a model's quality reads P(it
        # beats the reference) (docs/evaluation.md, "Trained on AlpacaEval alone").
        self.anchored_ = not any(terms.compare[d] == "bar" for d in np.unique(terms.dataset))
        free = torch.ones(n_models)
        if self.anchored_:
            free[terms.reference] = 0.0

        def widen() -> torch.Tensor:
            return torch.cat([x, torch.relu(x @ W1 + c1)], dim=1) if self.hidden else x

        def objective() -> torch.Tensor:
            xw = widen()
            ability = xw @ (P @ V.T + A) + b  # (N, M)
            difficulty = xw @ wd + bd  # (N,)
            penalty = torch.zeros(())
            if L is not None:
                lex = torch.sparse.mm(phi, L)  # (N, M + 1)
                ability, difficulty = ability + lex[:, :-1], difficulty + lex[:, -1]
                penalty = float(self.lexical_l2 or 0.0) * L.square().sum()
            if self.anchored_:
                ability = ability * free
            s = ability[row, model]  # (K,)
            against = torch.where(is_bar, difficulty[row], ability[row, terms.reference] - offset[dset])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(s - against, y, weight=weight)
            return (
                loss
                + self.l2 * (P.square().sum() + V.square().sum() + wd.square().sum())
                + l2_direct * A.square().sum()
                + self.l2_hidden * W1.square().sum()
                + penalty
            )

        # 2. full-batch training: the data is small enough to see all of it every step
        if self.optimizer == "lbfgs":
            opt: torch.optim.Optimizer = torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=self.steps,
                history_size=20,
                line_search_fn="strong_wolfe",
                tolerance_grad=1e-6,
                tolerance_change=1e-10,
            )

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = objective()
                loss.backward()
                return loss

            opt.step(closure)  # type: ignore[arg-type]  # LBFGS closures return the loss tensor
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
            for _ in range(self.steps):
                opt.zero_grad()
                objective().backward()
                opt.step()
        else:
            raise ValueError(f"optimizer must be adam or lbfgs, got {self.optimizer!r}")
        with torch.no_grad():
            loss = objective()

        # 3. collapse to the exported form: one (dim, M + 1) matrix and bias, over the raw inputs
        # (the standardization folded in: (x - shift) / scale @ W = x @ (W / scale) - (shift / scale) @ W)
        with torch.no_grad():
            out_w = np.concatenate([(P @ V.T + A).numpy(), wd.numpy()[:, None]], axis=1).astype(np.float64)
            out_b = np.concatenate([b.numpy(), bd.numpy()[None]]).astype(np.float64)
            if self.anchored_:  # the reference's column is held at 0 (see `free` above)
                out_w[:, terms.reference] = 0.0
                out_b[terms.reference] = 0.0
            w1 = W1.numpy().astype(np.float64)
            b1 = c1.numpy().astype(np.float64) - (shift / scale) @ w1
            w1 = w1 / scale[:, None]
            out_b = out_b - (shift / scale) @ out_w[:n_in]
            out_w[:n_in] = out_w[:n_in] / scale[:, None]
            self.weight_, self.bias_ = out_w.astype(np.float32), out_b.astype(np.float32)
            self.offset_ = offset.numpy().astype(np.float32)
            self.hidden_weight_ = w1.astype(np.float32)  # (n_in, hidden); (n_in, 0) when off
            self.hidden_bias_ = b1.astype(np.float32)
            self.train_loss_ = float(loss)
            self.lexicon_ = lexicon
            self.lexical_weight_ = None if L is None else L.numpy().astype(np.float32)  # (F, M + 1)
            if self.anchored_ and self.lexical_weight_ is not None:
                self.lexical_weight_[:, terms.reference] = 0.0
        self.n_models_ = n_models
        self.win_temperature_ = 1.0  # plain Bradley-Terry until training.fit calibrates it
        self.win_pairs_: list[Any] = []  # router.artifacts.WinPair, fitted by training.fit too
        self.gate_: Any = None  # router.artifacts.GateSpec and the open-ended pairs: training.fit too
        self.open_win_pairs_: list[Any] = []
        return self

    def _standardization(self, X: F32, rows: npt.NDArray[np.int64]) -> tuple[F64, F64]:
        """(shift, scale) per input column: the identity, or with `standardize` the embedding
        columns' mean and std over the training rows times sqrt(dim); the length features
        (the last columns, already scaled by router.scoring) are left alone."""
        n_in = X.shape[1]
        shift, scale = np.zeros(n_in), np.ones(n_in)
        if self.standardize:
            dim = n_in - len(LENGTH_FEATURES)
            emb = np.asarray(X[rows, :dim], np.float64)
            shift[:dim] = emb.mean(axis=0)
            scale[:dim] = np.maximum(emb.std(axis=0), 1e-6) * np.sqrt(dim)
        return shift, scale

    def widen(self, X: F32) -> F32:
        """x' = [x, relu(x W1 + c1)], or x itself for the linear head."""
        W1 = getattr(self, "hidden_weight_", None)
        if W1 is None or W1.shape[1] == 0:
            return X
        return np.hstack([X, np.maximum(X @ W1 + self.hidden_bias_, 0.0)]).astype(np.float32)

    def logits(self, X: F32, tokens: Tokens | None = None) -> tuple[F32, F32]:
        """Ability (N, M) and difficulty (N,), exactly what head.onnx computes."""
        z = self.widen(X.astype(np.float32)) @ self.weight_ + self.bias_
        lexicon, weight = getattr(self, "lexicon_", None), getattr(self, "lexical_weight_", None)
        if lexicon is not None and weight is not None:
            if tokens is None:
                raise ValueError("this head reads lexical features: pass the prompts' tokens")
            index, value = lexicon.features(tokens.input_ids, tokens.lengths)
            z = z + lexical_logits(weight, index, value)
        return z[:, :-1], z[:, -1]

    def term_probability(self, X: F32, terms: Terms, tokens: Tokens | None = None) -> F32:
        """P(outcome = 1) for each term, with its data set's comparison (for held-out metrics)."""
        ability, difficulty = self.logits(X, tokens)
        s = ability[terms.row, terms.model]
        is_bar = np.array([c == "bar" for c in terms.compare])[terms.dataset]
        against = np.where(
            is_bar, difficulty[terms.row], ability[terms.row, terms.reference] - self.offset_[terms.dataset]
        )
        return (1.0 / (1.0 + np.exp(-(s - against)))).astype(np.float32)
