"""Weight math over factored LoRA deltas: ΔW = s·L·R with L (m×r), R (r×n), never materialised.

L is lora_B and R is lora_A for a Linear or Conv1D module (ΔW in Linear orientation [out, in]); for an
embedding L = lora_embedding_Aᵀ and R = lora_embedding_Bᵀ (ΔW in the weight's [vocab, dim]). Pure
functions over torch tensors; callers pass float64 for accuracy. No MLflow, no files.
"""
from __future__ import annotations

import math

import torch

# Relative slack on the |ΔW_ij| bound so a float64 rounding tie never skips the true extreme.
_BOUND_SLACK = 1e-12


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's LoraLayer.update_layer)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def factored_svd(left: torch.Tensor, right: torch.Tensor, scale: float):
    """ΔW = s·L·R = U·diag(S)·Vᵀ: L = Q_L·R_L, Rᵀ = Q_R·R_R (thin QR), SVD of the core s·R_L·R_Rᵀ."""
    r_left, r_right, u_core, singular, vh_core = _core_svd(left, right, scale)
    return (_orthonormal_side(left, r_left, u_core), singular,
            _orthonormal_side(right.T, r_right, vh_core.T))


def balanced_factored_svd(left: torch.Tensor, right: torch.Tensor, scale: float):
    """ΔW = s·L·R = X·Yᵀ with X = U·√S = Q_L·(U_c·√S), Y = V·√S = Q_R·(V_c·√S) (factored_svd's
    QRs and core SVD, √S applied to the r×r side: one pass over each factor)."""
    r_left, r_right, u_core, singular, vh_core = _core_svd(left, right, scale)
    root = singular.clamp_min(0).sqrt()
    return (_orthonormal_side(left, r_left, u_core * root), singular,
            _orthonormal_side(right.T, r_right, vh_core.T * root))


def _core_svd(left: torch.Tensor, right: torch.Tensor, scale: float):
    """R_L, R_R of the thin QRs of L and Rᵀ and the SVD U_c·S·V_cᵀ of the core s·R_L·R_Rᵀ."""
    r_left, r_right = _triangular_factor(left), _triangular_factor(right.T)
    u_core, singular, vh_core = torch.linalg.svd(scale * (r_left @ r_right.T), full_matrices=False)
    return r_left, r_right, u_core, singular, vh_core


def _triangular_factor(matrix: torch.Tensor) -> torch.Tensor:
    """R of the thin QR of a tall factor (Q is never formed: Q·W = M·R⁻¹·W when needed)."""
    return torch.linalg.qr(matrix, mode="r")[1]


def _orthonormal_side(matrix: torch.Tensor, triangular: torch.Tensor, core: torch.Tensor):
    """Q·core = M·(R⁻¹·core), or through the explicit Q when R is (nearly) singular."""
    diagonal = triangular.diagonal().abs()
    square = triangular.shape[0] == triangular.shape[1]
    if square and diagonal.numel() and diagonal.min() > 1e-8 * diagonal.max():
        return matrix @ torch.linalg.solve_triangular(triangular, core, upper=True)
    return torch.linalg.qr(matrix)[0] @ core


def balanced_factors(u: torch.Tensor, singular: torch.Tensor, v: torch.Tensor):
    """X = U·√S, Y = V·√S so that ΔW = X·Yᵀ with the two sides' row norms balanced."""
    root = singular.clamp_min(0).sqrt()
    return u * root, v * root


def singular_vectors(x: torch.Tensor, singular: torch.Tensor, y: torch.Tensor):
    """U = X·S^-½, V = Y·S^-½ from balanced factors (the columns of σ = 0 left zero)."""
    root = singular.clamp_min(0).sqrt()
    inverse = torch.where(root > 0, 1 / root, 0.0)
    return x * inverse, y * inverse


def frobenius(singular: torch.Tensor) -> float:
    """‖ΔW‖_F = sqrt(Σ σ_i²)."""
    return float(singular.square().sum().sqrt())


def combined_fro(part_fros) -> float:
    """‖ΔW‖_F of a matrix split into row blocks = sqrt(Σ_parts ‖ΔW_part‖_F²)."""
    return math.sqrt(sum(f * f for f in part_fros))


def effective_rank(singular: torch.Tensor) -> float:
    """exp(−Σ p_i·ln p_i) with p_i = σ_i / Σσ (Roy & Vetterli 2007); 0 for ΔW = 0."""
    total = singular.sum()
    if not total > 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(singular: torch.Tensor) -> float:
    """‖ΔW‖_F² / ‖ΔW‖_2² = Σσ_i² / σ_1²; 0 for ΔW = 0."""
    top = singular.max() if singular.numel() else torch.tensor(0.0)
    return float(singular.square().sum() / top.square()) if top > 0 else 0.0


def energy_rank(singular: torch.Tensor, fraction: float) -> int:
    """Smallest k with Σ_{i<=k} σ_i² >= fraction·Σ σ_i² (σ descending); 0 for ΔW = 0."""
    energy = singular.square()
    total = energy.sum()
    if not total > 0:
        return 0
    cumulative = energy.cumsum(0) / total
    return int((cumulative < fraction - 1e-12).sum()) + 1


def row_norms(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """‖ΔW_i,:‖₂ = |s|·sqrt(l_iᵀ (R·Rᵀ) l_i) for every row i."""
    gram = right @ right.T
    return abs(scale) * ((left @ gram) * left).sum(dim=1).clamp_min(0).sqrt()


def block_edges(size: int, blocks: int) -> torch.Tensor:
    """Integer boundaries splitting `size` indices into min(size, blocks) nearly equal blocks."""
    count = min(size, blocks)
    return torch.div(torch.arange(count + 1) * size, count, rounding_mode="floor")


def pooled_rows(matrix: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mean of the rows of `matrix` within each block [edges[k], edges[k+1])."""
    sizes = edges[1:] - edges[:-1]
    if int(sizes.min()) == int(sizes.max()):  # equal blocks: a view, one pass
        return matrix.reshape(sizes.numel(), -1, matrix.shape[1]).mean(dim=1)
    block_of_row = torch.repeat_interleave(torch.arange(sizes.numel()), sizes).to(matrix.device)
    sums = matrix.new_zeros(sizes.numel(), matrix.shape[1]).index_add_(0, block_of_row, matrix)
    return sums / sizes.to(device=matrix.device, dtype=matrix.dtype).unsqueeze(1)


def block_means(left: torch.Tensor, right: torch.Tensor, scale: float, blocks: int) -> torch.Tensor:
    """Block means of ΔW on a ≤blocks×blocks grid: s·(row-pooled L)·(column-pooled R), exact."""
    row_edges, col_edges = block_edges(left.shape[0], blocks), block_edges(right.shape[1], blocks)
    return scale * pooled_rows(left, row_edges) @ pooled_rows(right.T, col_edges).T


def block_means_dense(delta: torch.Tensor, blocks: int) -> torch.Tensor:
    """Block means of a dense ΔW on a ≤blocks×blocks grid."""
    row_edges, col_edges = block_edges(delta.shape[0], blocks), block_edges(delta.shape[1], blocks)
    return pooled_rows(pooled_rows(delta, row_edges).T, col_edges).T


def entry_sum(left: torch.Tensor, right: torch.Tensor, scale: float) -> float:
    """Σ_ij ΔW_ij = s·(1ᵀL)·(R·1); the mean is this over m·n."""
    return float(scale * (left.sum(dim=0) @ right.sum(dim=1)))


def extreme_entries(x: torch.Tensor, y: torch.Tensor, x_norms: torch.Tensor | None = None,
                    **search):
    """Exact (min, max) of ΔW = X·Yᵀ and the entries evaluated: batched_extreme_entries for one."""
    low, high, evaluated = batched_extreme_entries(
        x.unsqueeze(0), y.unsqueeze(0),
        x_norms=None if x_norms is None else x_norms.unsqueeze(0), **search)
    return float(low[0]), float(high[0]), evaluated


def entry_tiles(x: torch.Tensor, y: torch.Tensor, max_entries: int = 1 << 18):
    """Every entry of ΔW = X·Yᵀ, tile by tile (rows), for an exact pass such as a histogram."""
    rows = max(1, max_entries // max(1, y.shape[0]))
    for start in range(0, x.shape[0], rows):
        yield x[start:start + rows] @ y.T


def sample_entries(x: torch.Tensor, y: torch.Tensor, count: int, generator: torch.Generator,
                   chunk: int = 1 << 16):
    """`count` entries ΔW_ij = x_i·y_j at uniformly random (i, j), with replacement (evaluated
    in chunks: a million rows of X and Y gathered at once cost more than the products)."""
    rows = torch.randint(0, x.shape[0], (count,), generator=generator).to(x.device)
    cols = torch.randint(0, y.shape[0], (count,), generator=generator).to(x.device)
    if count <= chunk:
        return torch.linalg.vecdot(x[rows], y[cols])
    return torch.cat([torch.linalg.vecdot(x[rows[i:i + chunk]], y[cols[i:i + chunk]])
                      for i in range(0, count, chunk)])


def amplification_factor(u: torch.Tensor, v: torch.Tensor, singular: torch.Tensor,
                         base: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖Uᵀ·W·V‖_F with U, V ΔW's top-r singular vectors (Hu et al. 2021, §7.3)."""
    keep = singular > 0
    projected = u[:, keep].T @ base @ v[:, keep]
    denominator = float(projected.norm())
    return frobenius(singular) / denominator if denominator > 0 else math.inf


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor, top_k: int, threshold: float) -> int:
    """How many of the top-k left singular vectors of W+ΔW have max_j |cos(·, u_j(W))| < threshold.

    Shuttleworth et al. 2024 ("LoRA vs full fine-tuning: an illusion of equivalence").
    """
    base_u = torch.linalg.svd(base, full_matrices=False)[0]
    tuned_u = torch.linalg.svd(tuned, full_matrices=False)[0][:, :top_k]
    best_cos = (tuned_u.T @ base_u).abs().max(dim=1).values
    return int((best_cos < threshold).sum())


def dora_delta(base: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's effective ΔW = m / ‖W + s·L·R‖_row ⊙ (W + s·L·R) − W (row norms over inputs)."""
    merged = base + scale * (left @ right)
    return (magnitude / merged.norm(dim=1)).unsqueeze(1) * merged - base


# ---- Stacks of experts: the same math over (E, ...) tensors, one batched call per stack. ----

def gram_root(gram: torch.Tensor, cutoff: float = 1e-12):
    """For stacked Gram matrices G = MᵀM (E, r, r) = W·Λ·Wᵀ: (W·Λ^½, W·Λ^-½), eigenvalues below
    cutoff·λ_max dropped (M = Q·(W·Λ^½)ᵀ with Q = M·W·Λ^-½ orthonormal on M's range)."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    keep = eigenvalues > cutoff * eigenvalues.amax(dim=-1, keepdim=True).clamp_min(0)
    root = torch.where(keep, eigenvalues.clamp_min(0).sqrt(), 0.0)
    inverse = torch.where(keep, 1 / torch.where(keep, root, 1.0), 0.0)
    return vectors * root.unsqueeze(-2), vectors * inverse.unsqueeze(-2)


def batched_factored_svd(left: torch.Tensor, right: torch.Tensor, scale: float,
                         right_root=None):
    """ΔW_e = s·L_e·R_e for L (E, m, r), R (E, r, n), through the r×r Grams (one pass over each
    factor): with L = Q_L·P_Lᵀ, Rᵀ = Q_R·P_Rᵀ (gram_root), the SVD of the core s·P_Lᵀ·P_R = U_c·S·V_cᵀ
    gives ΔW_e = X_e·Y_eᵀ with X = L·N_L·U_c·√S = U·√S and Y = Rᵀ·N_R·V_c·√S = V·√S (balanced
    factors), S (E, k) descending. `right_root`: gram_root of R·Rᵀ when already computed (the gate
    and up parts of one gate_up_proj share their R)."""
    p_left, n_left = gram_root(left.transpose(-2, -1) @ left)
    p_right, n_right = right_root or gram_root(right @ right.transpose(-2, -1))
    u_core, singular, vh_core = torch.linalg.svd(scale * (p_left.transpose(-2, -1) @ p_right))
    root = singular.sqrt().unsqueeze(-2)
    x = left @ (n_left @ (u_core * root))
    y = right.transpose(-2, -1) @ (n_right @ (vh_core.transpose(-2, -1) * root))
    return x, singular, y


def batched_spectrum(singular: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per expert from S (E, k), descending: ‖ΔW‖_F = sqrt(Σσ²), σ₁, effective rank
    exp(−Σ p·ln p) with p = σ/Σσ, stable rank Σσ²/σ₁², and the 90%/99% energy ranks (0 for ΔW = 0)."""
    energy = singular.square()
    total_energy = energy.sum(dim=-1)
    total = singular.sum(dim=-1)
    top = singular.amax(dim=-1) if singular.shape[-1] else torch.zeros_like(total)
    moved = total > 0
    p = singular / torch.where(moved, total, 1.0).unsqueeze(-1)
    effective = torch.where(moved, torch.special.entr(p).sum(dim=-1).exp(), 0.0)
    stable = torch.where(top > 0, total_energy / torch.where(top > 0, top, 1.0).square(), 0.0)
    cumulative = energy.cumsum(dim=-1) / torch.where(total_energy > 0, total_energy, 1.0).unsqueeze(-1)
    ranks = {f: torch.where(total_energy > 0, (cumulative < f - 1e-12).sum(dim=-1) + 1, 0)
             for f in (0.90, 0.99)}
    return {"fro": total_energy.sqrt(), "spectral": top, "effective_rank": effective,
            "stable_rank": stable, "energy_rank_90": ranks[0.90], "energy_rank_99": ranks[0.99]}


def batched_row_norms(x: torch.Tensor, singular: torch.Tensor):
    """(‖ΔW_e[i, :]‖₂ = sqrt(Σ_k x_ik²·σ_k), ‖x_i‖ = sqrt(Σ_k x_ik²)) for ΔW_e = X_e·Y_eᵀ, X = U·√S,
    Y = V·√S: each (E, m), or (m,) for one module (both Σ_k as one product of X² with [σ, 1]:
    a third of an elementwise product's time, and X squared once for the two)."""
    weights = torch.stack([singular, torch.ones_like(singular)], dim=-1)
    both = (x.square() @ weights).sqrt()
    return both[..., 0], both[..., 1]


def batched_entry_sums(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """Σ_ij ΔW_e,ij = s·(1ᵀL_e)·(R_e·1) for every expert: (E,)."""
    return scale * (left.sum(dim=-2) * right.sum(dim=-1)).sum(dim=-1)


def _rows_in_order(stack: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """stack[e, order[e, i]] for (E, m, k) and (E, p), p <= m: one index_select over the flattened
    rows (torch's gather with an expanded index is ten times slower on the CPU)."""
    experts, rows = stack.shape[:2]
    flat = (order + torch.arange(experts, device=order.device).unsqueeze(1) * rows).reshape(-1)
    return stack.reshape(experts * rows, -1).index_select(0, flat).reshape(
        experts, order.shape[1], -1)


def _descending_order(norms: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of norms (E, m) from largest to smallest."""
    if norms.device.type == "cpu":  # numpy's vectorised argsort: a quarter of torch.sort's time
        return torch.from_numpy((-norms.numpy()).argsort(axis=-1))
    return norms.argsort(dim=-1, descending=True)


def _needed_prefix(norms: torch.Tensor, order: torch.Tensor, other_max: torch.Tensor,
                   threshold: torch.Tensor):
    """Norms (E, m) in `order` (descending) with those indices, cut after the last one whose bound
    ‖·‖·max‖other‖ can beat `threshold` (E,) in some expert."""
    needed = norms * (other_max * (1 + _BOUND_SLACK)).unsqueeze(-1) > threshold.unsqueeze(-1)
    order = order[:, :int(needed.sum(dim=-1).max())]
    return norms.gather(-1, order), order


def batched_extreme_entries(x: torch.Tensor, y: torch.Tensor, seed: int = 64,
                            first_tile: int = 8, row_tile: int = 64, group: int = 16,
                            max_entries: int = 1 << 22, x_norms: torch.Tensor | None = None):
    """Exact per-expert (min, max) of ΔW_e = X_e·Y_eᵀ, X (E, m, k), Y (E, n, k), evaluating only
    entries whose bound |ΔW_ij| <= ‖x_i‖·‖y_j‖ can still beat min(max, −min); returns (min, max,
    entries evaluated). `x_norms`: ‖x_i‖ (E, m) when already computed.

    Rows and columns are sorted by norm; the `seed`×`seed` block of the largest gives first
    extremes, and only the prefixes the bound can then still need are copied; row tiles (first_tile
    rows, doubling up to row_tile) are each multiplied with the prefix of columns the tile's first
    row could still need, the experts of a tile in groups of at most `group` by that width, so that
    few compute columns only another one needs.
    """
    x_all = x.norm(dim=-1) if x_norms is None else x_norms
    y_all = y.norm(dim=-1)
    rows_sorted, cols_sorted = _descending_order(x_all), _descending_order(y_all)
    block = (_rows_in_order(x, rows_sorted[:, :seed])
             @ _rows_in_order(y, cols_sorted[:, :seed]).transpose(-2, -1))
    high, low = block.amax(dim=(1, 2)), block.amin(dim=(1, 2))
    evaluated = block.numel()
    # Rows and columns none of whose entries can beat the seed's extremes are never copied (most
    # of them, for a trained adapter's decaying spectrum).
    first = torch.minimum(high, -low)
    x_norms, row_order = _needed_prefix(x_all, rows_sorted, y_all.amax(dim=-1), first)
    y_norms, col_order = _needed_prefix(y_all, cols_sorted, x_all.amax(dim=-1), first)
    # Copied once (one pass each): every tile below is then a view of a prefix.
    xs, ys = _rows_in_order(x, row_order), _rows_in_order(y, col_order)
    start, rows_now = 0, first_tile
    while start < xs.shape[1]:
        # Row `start` (the tile's largest norm) needs the columns with ‖y_j‖ above this limit; an
        # extreme still at or below zero needs every column (an entry 0 beats it).
        threshold = torch.minimum(high, -low)
        limit = threshold / (x_norms[:, start] * (1 + _BOUND_SLACK))
        wanted, by_width = (y_norms > limit.unsqueeze(-1)).sum(dim=-1).sort(descending=True)
        widths = wanted.tolist()
        live = sum(1 for w in widths if w > 0)
        if live == 0:
            break
        rows = xs[:, start:start + rows_now]
        first = 0
        while first < live:
            width = widths[first]
            count = max(1, min(group, max_entries // (rows.shape[1] * width)))
            which = by_width[first:min(live, first + count)]
            tile = rows[which] @ ys[which, :width].transpose(-2, -1)
            high[which] = torch.maximum(high[which], tile.amax(dim=(1, 2)))
            low[which] = torch.minimum(low[which], tile.amin(dim=(1, 2)))
            evaluated += tile.numel()
            first += which.numel()
        start += rows_now
        rows_now = min(2 * rows_now, row_tile)
    return low, high, evaluated
