"""How the next token is chosen from the model's logits: one at a time (sample), or several at once
from a verification pass of speculative decoding (accept), keeping the model's distribution exactly.

Sampling is an exponential race: with E_i ~ Exp(1) drawn for every token, E_i / p_i is exponential
with rate p_i, and the smallest of such is token i's with probability p_i / sum(p), so argmax p / E
draws from p, normalized or not. Unlike torch.multinomial, which checks its input on the host, nothing
here waits for the device: decode queues the next step while this one runs.
"""
import torch
from torch import Tensor


def probabilities(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    """The distribution a token is drawn from at temperature > 0: softmax(logits / T) over the top k."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def draw(p: Tensor, generator) -> Tensor:
    """One token [..., 1] from each row of p (weights >= 0, not necessarily normalized)."""
    # E > 0: a zero would turn a masked token's 0 / E into NaN, which argmax takes as the largest.
    race = torch.empty_like(p).exponential_(generator=generator).clamp_(min=torch.finfo(p.dtype).tiny)
    return (p / race).argmax(dim=-1, keepdim=True)


def sample(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """Next token [B, 1] from logits [B, vocab]: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return draw(probabilities(logits, temperature, top_k), generator)


# --- speculative decoding: which drafts a verification pass accepts -----------------------------

def accept(logits: Tensor, drafts: list[int], q: Tensor | None, temperature: float, top_k: int | None,
           generator) -> list[int]:
    """The tokens a verification pass yields: logits [n + 1, vocab] of the pass over the last token and
    the n drafts (row i predicts what follows draft i - 1), q [n, vocab] the distributions the drafts were
    drawn from (None: each draft was chosen deterministically, a point mass). Returns the accepted
    drafts and one token more: the model's own at the first rejection, or after the last draft."""
    if temperature == 0:
        return accept_greedy(logits, drafts)
    return accept_sampled(probabilities(logits, temperature, top_k), drafts, q, generator)


def accept_greedy(logits: Tensor, drafts: list[int]) -> list[int]:
    """The longest prefix of the drafts that are the model's argmax, then the model's argmax after it:
    exactly the tokens greedy decoding would give one by one."""
    best = logits.argmax(dim=-1).tolist()
    n = next((i for i, (d, b) in enumerate(zip(drafts, best)) if d != b), len(drafts))
    return drafts[:n] + [best[n]]


def accept_sampled(p: Tensor, drafts: list[int], q: Tensor | None, generator) -> list[int]:
    """Speculative sampling (Leviathan et al., arXiv 2211.17192, Alg. 1; Chen et al., arXiv 2302.01318):
    draft x, drawn from q, is kept with probability min(1, p(x) / q(x)); at the first rejection the token
    is drawn from max(0, p - q), normalized. Each yielded token is then distributed as p exactly, as if
    drawn by sample() one at a time. p [n + 1, vocab] (target), q [n, vocab] or None (point masses:
    q(x) = 1, so x is kept with probability p(x) and the residual is p without x)."""
    u = torch.rand(len(drafts), generator=generator, device=p.device).tolist()
    kept = []
    for i, x in enumerate(drafts):
        p_x = float(p[i, x])
        q_x = 1.0 if q is None else float(q[i, x])
        if u[i] * q_x < p_x:  # u < p(x) / q(x), without dividing by a q(x) that may be 0
            kept.append(x)
            continue
        if q is None:
            residual = p[i].clone()
            residual[x] = 0
        else:
            residual = (p[i] - q[i]).clamp_(min=0)
        return kept + [int(draw(residual, generator))]
    return kept + [int(draw(p[len(drafts)], generator))]
