"""REALM as plain torch modules: no Ray, no DeepSpeed, no I/O beyond save/load.

    p(y|x) = Σ_{z ∈ top-k ∪ {∅}} p(y|z,x) p(z|x)

* `Retriever`: query and doc BERTs, pooled ([CLS] or mean) -> linear -> `retrieval_dim`; relevance is the
  inner product. The index only *selects* candidates: their scores are recomputed here with the
  current encoders, so gradients reach both.
* `KnowledgeAugmentedEncoder`: a BERT over `[CLS] x [SEP] z [SEP]` with an MLM head tied to the
  word embeddings (optionally mixed with a pointer into z); scores the masked tokens of x.
* `marginal_log_likelihood`: the equation above, in log space. The null document ∅ has a
  learned relevance score and reads `[CLS] x [SEP]` alone.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel


class Tower(nn.Module):
    """One side of the retriever: BERT -> pooled ([CLS] or mean; `_l2`: then L2-normalized) -> linear -> `dim`.

    With `_l2` pooling and a projection from `pca_projection`, inner products of the outputs are a scaled
    cosine of the encoder's own embeddings (how MiniLM was trained to be compared), up to what the
    projection drops.
    """

    def __init__(self, encoder: BertModel, dim: int, pooling: str = "cls"):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.config.hidden_size, dim)
        self.pooling = pooling

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, L] int64 ids and attention mask -> [N, hidden] float: the projection's input."""
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling.startswith("mean"):
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = hidden[:, 0]
        if self.pooling.endswith("_l2"):
            pooled = F.normalize(pooled, dim=-1)
        return pooled

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, L] int64 ids and attention mask -> [N, dim] float."""
        return self.proj(self.pooled(ids, mask))


def pca_projection(pooled: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """A [dim, H] projection that keeps the inner products of unit vectors: the top-`dim` right singular
    vectors of the (uncentered) matrix of the L2-normalized rows of `pooled` [N, H], times `scale`.

    W^T W is then scale² times the orthogonal projector onto those directions, so for unit x, y
    (Wx)·(Wy) = scale² (x·y - the part of x·y outside them): exact for vectors in their span, and what
    is lost is the energy of the sample past the first `dim` singular values. Rows past H are zero.
    """
    x = F.normalize(pooled.detach().double(), dim=-1)
    _, _, vh = torch.linalg.svd(x, full_matrices=True)  # [H, H], largest singular value first
    w = torch.zeros(dim, x.shape[1], dtype=torch.float64)
    w[:min(dim, len(vh))] = vh[:dim]
    return (w * scale).float()


class Retriever(nn.Module):
    def __init__(self, query_encoder: BertModel, doc_encoder: BertModel, dim: int = 128, pooling: str = "cls"):
        super().__init__()
        self.query_tower = Tower(query_encoder, dim, pooling)
        self.doc_tower = Tower(doc_encoder, dim, pooling)
        self.doc_tower.proj.load_state_dict(self.query_tower.proj.state_dict())  # start symmetric

    @torch.no_grad()
    def set_projection(self, weight: torch.Tensor) -> None:
        """Both towers' projections := weight [dim, H], bias 0 (e.g. from `pca_projection`)."""
        for tower in (self.query_tower, self.doc_tower):
            tower.proj.weight.copy_(weight)
            tower.proj.bias.zero_()

    def embed_queries(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L] int64 -> [B, dim] float."""
        return self.query_tower(ids, mask)

    def embed_docs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N, L] int64 -> [N, dim] float."""
        return self.doc_tower(ids, mask)


class MLMHead(nn.Module):
    """BERT's prediction head; the output matrix is the (tied) input word-embedding matrix."""

    def __init__(self, word_embeddings: nn.Embedding, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h)))
        return F.linear(h, self.word_embeddings.weight, self.bias)


class CopyHead(nn.Module):
    """A pointer from each masked position into z (See et al. 2017's pointer-generator, over z only).

    p(w) = g · p_vocab(w) + (1 - g) · Σ_{i ∈ z, token_i = w} attention_i. A reader whose MLM head is
    fresh (MiniLM ships none) must first learn to map hidden states onto 30k words before z can help
    it; matching the mask's context against z's tokens is learned in far fewer steps, and it is the
    skill the span reader of fine-tuning needs. Without z (the null document) g is 1.
    """

    def __init__(self, hidden: int, init: str = "random"):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)
        if init == "identity":  # start as the plain inner product of the encoder's own states: a token of z that
            with torch.no_grad():  # the encoder represents like the masked position's context is pointed at first
                for lin in (self.query, self.key):
                    lin.weight.copy_(torch.eye(hidden))
                    lin.bias.zero_()
        elif init != "random":
            raise ValueError(f"copy head init must be random or identity, got {init!r}")

    def forward(self, at: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, in_z: torch.Tensor,
                vocab_log_probs: torch.Tensor) -> torch.Tensor:
        """at [N, M, H] (masked positions), hidden [N, L, H], ids [N, L], in_z [N, L] bool,
        vocab_log_probs [N, M, V] float32 -> mixed log-probabilities [N, M, V] float32."""
        att = torch.einsum("nmh,nlh->nml", self.query(at), self.key(hidden)).float() / at.size(-1) ** 0.5
        has_z = in_z.any(-1)
        att = att.masked_fill(~in_z[:, None, :], float("-inf")).masked_fill(~has_z[:, None, None], 0.0).softmax(-1)
        p_copy = vocab_log_probs.new_zeros(vocab_log_probs.shape)
        p_copy.scatter_add_(-1, ids[:, None, :].expand_as(att), att * in_z[:, None, :])
        gate, no_z = self.gate(at).float(), ~has_z[:, None, None]   # [N, M, 1]
        log_g = F.logsigmoid(gate).masked_fill(no_z, 0.0)
        log_1m_g = F.logsigmoid(-gate).masked_fill(no_z, float("-inf"))
        # clamp: words absent from z have p_copy 0; log(0)'s gradient would turn the sum's into NaN
        return torch.logaddexp(log_g + vocab_log_probs, log_1m_g + p_copy.clamp_min(1e-30).log())


class KnowledgeAugmentedEncoder(nn.Module):
    """BERT + MLM head (`head="mlm"`, the paper), or + a copy head mixed into it (`head="copy"`).

    The copy head points with the hidden states after layer `copy_layer` (0 = the last). A warm start's last
    layer may be trained for something else (MiniLM's for mean pooling: its token states look alike), and
    an earlier layer's states still tell tokens apart.
    """

    def __init__(self, bert: BertModel, head: str = "mlm", copy_layer: int = 0, copy_init: str = "random"):
        super().__init__()
        self.bert = bert
        self.mlm_head = MLMHead(bert.embeddings.word_embeddings, bert.config.hidden_size,
                                bert.config.layer_norm_eps)
        self.copy_head: CopyHead | None = None
        self.use_head(head, copy_layer, copy_init)

    def use_head(self, head: str, copy_layer: int = 0, copy_init: str = "random") -> None:
        """Switch the output head (a checkpoint written with another one: ICT never trains it). A copy head
        already there is kept if it was set up the same way."""
        layers = self.bert.config.num_hidden_layers
        if not 0 <= copy_layer <= layers:
            raise ValueError(f"copy_layer must be between 0 (the last) and the reader's {layers} layers, "
                             f"got {copy_layer}")
        copy_layer = 0 if copy_layer == layers else copy_layer  # the last layer is 0 either way
        if head == "copy" and (self.copy_head is None or (self.copy_layer, self.copy_init) != (copy_layer, copy_init)):
            self.copy_head = CopyHead(self.bert.config.hidden_size, copy_init).to(self.bert.device)
        elif head == "mlm":
            self.copy_head = None
            copy_layer, copy_init = 0, "random"
        self.head, self.copy_layer, self.copy_init = head, copy_layer, copy_init

    def masked_log_probs(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary at the masked positions.

        ids/mask/types [N, L] (type 1 = z); positions [N, M] int64 -> [N, M, V] float32.
        """
        out = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types,
                        output_hidden_states=self.copy_layer > 0)
        log_probs = F.log_softmax(self.mlm_head(_at(out.last_hidden_state, positions)).float(), dim=-1)
        if self.copy_head is None:
            return log_probs
        pointing = out.hidden_states[self.copy_layer] if self.copy_layer else out.last_hidden_state
        return self.copy_head(_at(pointing, positions), pointing, ids, (types == 1) & mask.bool(), log_probs)


def _at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, H] at positions [N, M] -> [N, M, H]."""
    return torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))


def span_log_prob(token_log_probs: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log p(y|z,x) = Σ over masked tokens: [N, M, V], [N, M], [N, M] -> [N]."""
    picked = torch.gather(token_log_probs, -1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked * target_mask).sum(-1)


def log_joint(retrieval_scores: torch.Tensor, span_log_probs: torch.Tensor) -> torch.Tensor:
    """log p(z|x) + log p(y|z,x), with p(z|x) a softmax over the candidates' scores: [B, Z], [B, Z] ->
    [B, Z] float32. A score of -inf removes a candidate (padding, or a block left out)."""
    return F.log_softmax(retrieval_scores.float(), dim=-1) + span_log_probs.float()


def marginal_log_likelihood(retrieval_scores: torch.Tensor, span_log_probs: torch.Tensor) -> torch.Tensor:
    """log Σ_z p(y|z,x) p(z|x).

    retrieval_scores, span_log_probs: [B, Z] (Z = k + 1, the null document included; a score of
    -inf removes a padded candidate) -> [B].
    """
    return torch.logsumexp(log_joint(retrieval_scores, span_log_probs), dim=-1)


def retrieval_posterior(retrieval_scores: torch.Tensor, span_log_probs: torch.Tensor) -> torch.Tensor:
    """Each candidate's share of the marginal, p(z|x) p(y|z,x) / p(y|x) = p(z|x, y): [B, Z], [B, Z] -> [B, Z]
    float32, rows summing to 1 (NaN for a row with no candidate left)."""
    return log_joint(retrieval_scores, span_log_probs).softmax(-1)


def marginal_token_log_probs(retrieval_scores: torch.Tensor, token_log_probs: torch.Tensor) -> torch.Tensor:
    """log p(word | x) at each masked position, marginalized over the candidates:
    scores [B, Z] (unnormalized log p(z|x)), token log-probs [B, Z, M, V] -> [B, M, V] float32."""
    log_p_z = retrieval_scores.float().log_softmax(-1)
    return torch.logsumexp(log_p_z[:, :, None, None] + token_log_probs.float(), 1)


def candidate_span_log_probs(token_log_probs: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor
                             ) -> torch.Tensor:
    """log p(y|z,x) for every candidate: token log-probs [B, Z, M, V], targets/target_mask [B, M] -> [B, Z]."""
    B, Z = token_log_probs.shape[:2]
    return span_log_prob(token_log_probs.flatten(0, 1), targets.repeat_interleave(Z, 0),
                         target_mask.repeat_interleave(Z, 0).to(token_log_probs.dtype)).view(B, Z)


def spans_correct(token_log_probs: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: every masked position's most likely word is its target ([B, M, V], [B, M], [B, M])."""
    return ((token_log_probs.argmax(-1) == targets) | ~target_mask.bool()).all(-1)


@dataclass
class RealmBatch:
    """Tensors for one pre-training step (B examples, K retrieved candidates + the null doc).

    query_ids/query_mask [B, Lq]       x with the salient span masked: the query encoder's input,
                                       and the reader's input for the null document
    cand_ids/cand_mask   [B, K, Ld]    candidate blocks, for the doc encoder
    cand_valid           [B, K] bool   False where fewer than K candidates exist
    reader_ids/mask/types [B, K, Lr]   [CLS] x [SEP] z [SEP] for each candidate z
    positions/targets/target_mask [B, M]  masked positions of x and their true token ids
    """
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    cand_ids: torch.Tensor
    cand_mask: torch.Tensor
    cand_valid: torch.Tensor
    reader_ids: torch.Tensor
    reader_mask: torch.Tensor
    reader_types: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor

    def to(self, device) -> RealmBatch:
        return RealmBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


class REALM(nn.Module):
    """`null_document=False` (the ablation) gives the null document a score of -inf, so p(z|x) and the
    marginal are over the top-k alone; a row with no valid candidate keeps it (else its marginal is empty).
    Column 0 of the scores and token log-probs stays the null document either way (x read alone)."""

    def __init__(self, retriever: Retriever, reader: KnowledgeAugmentedEncoder, null_document: bool = True):
        super().__init__()
        self.retriever, self.reader = retriever, reader
        self.null_score = nn.Parameter(torch.zeros(1))
        self.null_document = null_document

    def relevance(self, b: RealmBatch, train_retriever: bool = True) -> torch.Tensor:
        """Scores [B, K+1] recomputed with the current encoders; column 0 is the null doc.

        `train_retriever=False` computes the retriever's scores without a graph (a frozen phase
        costs no backward through the towers); the null score still learns.
        """
        B, K, Ld = b.cand_ids.shape
        with torch.set_grad_enabled(train_retriever and torch.is_grad_enabled()):
            q = self.retriever.embed_queries(b.query_ids, b.query_mask)
            d = self.retriever.embed_docs(b.cand_ids.view(B * K, Ld), b.cand_mask.view(B * K, Ld)).view(B, K, -1)
            scores = torch.einsum("bd,bkd->bk", q, d).float()
        scores = scores.masked_fill(~b.cand_valid, float("-inf"))
        null = self.null_score.float().expand(B, 1)
        if not self.null_document:
            null = null.masked_fill(b.cand_valid.any(-1, keepdim=True), float("-inf"))
        return torch.cat([null, scores], dim=1)

    def token_log_probs(self, b: RealmBatch) -> torch.Tensor:
        """[B, K+1, M, V] log p(token | z, x) at the masked positions; z = 0 is the null doc.

        The null doc's input is x alone, so it runs as its own short batch instead of being
        padded to the candidates' length.
        """
        B, K, Lr = b.reader_ids.shape
        null = self.reader.masked_log_probs(b.query_ids, b.query_mask, torch.zeros_like(b.query_ids), b.positions)
        pos = b.positions.unsqueeze(1).expand(B, K, -1).reshape(B * K, -1)
        cand = self.reader.masked_log_probs(b.reader_ids.view(B * K, Lr), b.reader_mask.view(B * K, Lr),
                                            b.reader_types.view(B * K, Lr), pos)
        return torch.cat([null.unsqueeze(1), cand.view(B, K, *cand.shape[1:])], dim=1)

    def forward(self, b: RealmBatch, train_retriever: bool = True, retriever_signal: str = "marginal"
                ) -> dict[str, torch.Tensor]:
        """`retriever_signal`: what the towers learn from. "marginal": -log p(y|x) itself, the
        null document among the candidates (the paper). "candidates": the reader and the null score still learn
        from -log p(y|x), but the towers from -log Σ_{z ∈ top-k} p(y|z,x) p(z|x, z ≠ ∅) with the reader's
        likelihoods held fixed. Its gradient on the candidates' scores sums to zero, so it only reorders them
        by their usefulness: once p(∅|x) wins, the paper's gradient lowers every retrieved block at once, which
        pushes the query away from its nearest neighbours, blocks that would help included."""
        scores = self.relevance(b, train_retriever)
        token_lp = self.token_log_probs(b)
        B = scores.shape[0]
        span_lp = candidate_span_log_probs(token_lp, b.targets, b.target_mask)
        reorder = retriever_signal == "candidates" and train_retriever and torch.is_grad_enabled()
        marginal_scores = torch.cat([scores[:, :1], scores[:, 1:].detach()], dim=1) if reorder else scores
        log_lik = marginal_log_likelihood(marginal_scores, span_lp)
        loss = -log_lik.mean()
        if reorder:
            ranked = b.cand_valid.any(-1)  # a row without a candidate has nothing to reorder
            among = marginal_log_likelihood(scores[ranked, 1:], span_lp[ranked, 1:].detach())
            loss = loss - among.sum() / B
        return {"loss": loss, "log_likelihood": log_lik, "scores": scores,
                "span_log_probs": span_lp, "token_log_probs": token_lp}


def build_realm(make_bert: Callable[[int], BertModel], retriever_layers: int = 0, reader_layers: int = 0,
                retrieval_dim: int = 128, pooling: str = "cls", reader_head: str = "mlm", copy_layer: int = 0,
                copy_init: str = "random") -> REALM:
    """Three BERTs from one init: query encoder, doc encoder (its copy) and reader. `make_bert(layers)`
    returns a fresh BertModel keeping the first `layers` layers (0 = all): trainer/bert.py's `bert_factory`."""
    query = make_bert(retriever_layers)
    retriever = Retriever(query, copy.deepcopy(query), retrieval_dim, pooling)
    reader = copy.deepcopy(query) if reader_layers == retriever_layers else make_bert(reader_layers)
    return REALM(retriever, KnowledgeAugmentedEncoder(reader, reader_head, copy_layer, copy_init))


class SpanHead(nn.Module):
    """score(s) = w · relu(W_s h_start + W_e h_end + b): an MLP over [h_start; h_end], computed
    without materializing the concatenation for every span."""

    def __init__(self, hidden: int):
        super().__init__()
        self.start = nn.Linear(hidden, hidden)
        self.end = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
        """h [N, L, H], span_mask [N, L, A] bool (span i..i+a allowed) -> scores [N, L, A] (-inf if not)."""
        N, L, A = span_mask.shape
        s, e = self.start(h), self.end(h)
        scores = h.new_full((N, L, A), float("-inf"), dtype=torch.float32)
        for a in range(min(A, L)):
            scores[:, :L - a, a] = self.out(F.relu(s[:, :L - a] + e[:, a:])).squeeze(-1).float()
        return scores.masked_fill(~span_mask, float("-inf"))


def span_log_softmax(span_scores: torch.Tensor) -> torch.Tensor:
    """log p(s|z,x): span scores [B, K, L, A] -> [B, K, L*A] float32, a softmax over each block's spans."""
    flat = span_scores.float().flatten(2)
    return flat - torch.logsumexp(flat, dim=-1, keepdim=True)


def span_log_joint(retrieval_scores: torch.Tensor, span_scores: torch.Tensor) -> torch.Tensor:
    """log p(z|x) + log p(s|z,x) for every span of every block: [B, K], [B, K, L, A] -> [B, K, L*A] float32
    (what the best answer is picked from)."""
    return F.log_softmax(retrieval_scores.float(), dim=-1)[:, :, None] + span_log_softmax(span_scores)


def answer_log_probs(span_scores: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log p(y|z,x) = log Σ_{s ∈ z, s matches y} p(s|z,x): span_scores [B, K, L, A] (-inf = not a span),
    answer_mask [B, K, L, A] bool -> [B, K]. Non-matching spans are masked with a finite -1e30, not -inf,
    so that a block with no match has a finite log-sum (about -1e30) and its gradient stays 0 instead of NaN."""
    return torch.logsumexp(span_log_softmax(span_scores).masked_fill(~answer_mask.flatten(2), -1e30), dim=-1)


def span_marginal_log_likelihood(retrieval_scores: torch.Tensor, span_scores: torch.Tensor,
                                 answer_mask: torch.Tensor) -> torch.Tensor:
    """log Σ_z p(z|x) Σ_{s ∈ z, s matches y} p(s|z,x).

    retrieval_scores [B, K] (-inf = no candidate); span_scores [B, K, L, A] (-inf = not a span);
    answer_mask [B, K, L, A] bool. p(s|z,x) is a softmax over the spans of each block. A block
    with no matching span contributes nothing; a question with none anywhere gets about -1e30
    (callers drop those rows).
    """
    return marginal_log_likelihood(retrieval_scores, answer_log_probs(span_scores, answer_mask))


class OpenQAModel(nn.Module):
    """Fine-tuning: the query tower and the span reader train; the doc tower stays frozen (the
    index was built with it and is never refreshed)."""

    def __init__(self, retriever: Retriever, reader: BertModel):
        super().__init__()
        self.retriever, self.reader = retriever, reader
        self.span_head = SpanHead(reader.config.hidden_size)
        for p in self.retriever.doc_tower.parameters():
            p.requires_grad_(False)

    def span_scores(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor, span_mask: torch.Tensor
                    ) -> torch.Tensor:
        """[N, L] reader inputs, span_mask [N, L, A] -> [N, L, A] span scores."""
        h = self.reader(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        return self.span_head(h, span_mask)
