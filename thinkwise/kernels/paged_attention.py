"""Paged KV-cache attention, plain-PyTorch reference implementation.

The KV cache of one layer is two tensors `[num_blocks, block_size, num_kv_heads,
head_dim]`; a sequence owns a list of block ids (its block table) and token `p` of it
lives in slot `block_table[p // block_size] * block_size + p % block_size`. These
functions write new keys/values into their slots and attend each query token to its own
sequence's context, causally, optionally within a sliding window (a query at position p
sees keys p - window + 1 .. p, Mistral's and Gemma's local layers, the rule of
transformers' `sliding_window_overlay`). They are the CPU path and the numerical twin that every
GPU kernel is tested against, so they favour clarity and exactness over speed, with one
concession: single-token (decode) queries of many sequences are handled as one padded
batch, because that is the hot loop of generation even on CPU.

8-bit KV cache (`EngineConfig.kv_cache_dtype="fp8"`): a layer's K or V cache is then an
`FP8KVCache`, float8 e4m3 codes of the same shape plus one fp32 scale per (slot, KV head),
value = code x scale. The scale is dynamic, amax / 448 of that token's head vector,
computed when the token is written: a static per-tensor scale of 1.0 would not do, since
e4m3 saturates at 448 and raw keys of real models are larger (the default model's
attention-sink keys give raw q.k near 9,700), and one scale per tensor calibrated ahead
to cover those would push ordinary tokens down into e4m3's few subnormals (its whole range
is 2^-9 .. 448). Per (token, head) keeps each vector's relative error at e4m3's own
(<= 1/16 per element, 4 significant bits) and is written in one pass,
with no calibration and no rescaling of old tokens; the fp32 scale costs 4 bytes beside
head_dim bytes (3% at head_dim 128), kept in fp32 so dequantization adds no rounding of
its own. Every read path (the decode reference, `gather_context` for prefill and cached
prefixes, batched prefill, cascade) dequantizes to fp32, so attention math is unchanged.
Prefill attends to the quantized values of its own chunk as well (read back from the
cache), not to the exact ones it just computed: a token's result is then the same whether
its context was cached, chunked or computed in one pass (prefix caching, preemption and
chunking change an fp8 run only by fp32 rounding). Data movement goes through uint8 views, which
every device's indexing kernels support.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from thinkwise.kernels import cpu_decode_ops

# "torch" forces the reference everywhere (for debugging a kernel); "auto" uses Triton on CUDA.
# Set from EngineConfig.attention_backend by the engine (`set_attention_backend`).
ATTENTION_BACKEND = "auto"
ATTENTION_BACKENDS = ("auto", "torch")


def set_attention_backend(name: str) -> None:
    global ATTENTION_BACKEND
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {ATTENTION_BACKENDS}")
    ATTENTION_BACKEND = name


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value: a head vector's amax maps to it
KV_SCALE_DTYPE = torch.float32
KV_SCALE_BYTES = 4  # one scale per (token, KV head), beside head_dim one-byte codes


# Which path the Triton decode kernel takes on an fp8 cache, for the run metadata: the engine
# puts this very dict there, and triton_decode_attention rewrites its entry if the fp16 path
# fails to build on a GPU, so the fallback shows there.
FP8_DECODE_PATHS = {"16-bit queries": "fp16 path", "fp32 queries": "conversion path"}


@dataclass(frozen=True)
class FP8KVCache:
    """One layer's K or V cache in fp8: `codes` [num_blocks, block_size, num_kv_heads,
    head_dim] float8_e4m3fn and `scales` [num_blocks, block_size, num_kv_heads] fp32, in any
    strides (the engine stores them head-major; kernels take the scales' own strides, and
    this module indexes them by (block, position), never through a flattened view). Passed
    wherever a plain cache tensor goes; `shape` is the codes' shape."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (e4m3 codes [..., head_dim], fp32 scales [...]): one scale per
    vector, amax / 448, so the vector's largest element lands on e4m3's largest value."""
    x32 = x.float()
    # An all-zero vector keeps a tiny positive scale (codes 0, dequantized 0), not 0/0.
    scales = x32.abs().amax(dim=-1).clamp(min=1e-30) / FP8_MAX
    # The clamp guards rounding of amax / scale just past 448 (older torch gives NaN there).
    codes = (x32 / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)
    return codes, scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 codes [..., head_dim] x scales [...] -> fp32 values."""
    return codes.float() * scales[..., None]


def _rows(cache, index: torch.Tensor) -> torch.Tensor:
    """`cache` gathered along its first dimension(s) by `index` (blocks, or slots of a flattened
    cache): the raw tensor for a plain cache, fp32 values for an fp8 one."""
    if not isinstance(cache, FP8KVCache):
        return cache[index]
    codes = cache.codes.view(torch.uint8)[index].view(FP8_KV_DTYPE)
    return dequantize_fp8(codes, cache.scales[index])


def _slot_rows(cache, slots: torch.Tensor) -> torch.Tensor:
    """The cached vectors of flat slot numbers `slots` (block x block_size + position):
    [len(slots), num_kv_heads, head_dim], fp32 values for an fp8 cache. Indexed by (block,
    position), not through a flattened view: the engine stores fp8 scales head-major, which no
    [num_slots, heads] view can show."""
    if not isinstance(cache, FP8KVCache):
        return cache.reshape(-1, *cache.shape[2:])[slots]
    blocks, positions = slots // cache.shape[1], slots % cache.shape[1]
    codes = cache.codes.view(torch.uint8)[blocks, positions].view(FP8_KV_DTYPE)
    return dequantize_fp8(codes, cache.scales[blocks, positions])


MAX_GROUP_MEMBERS = 16  # rows of one cascade group (more samples form more groups)


@dataclass
class PrefixGroups:
    """Decode rows grouped by a shared, block-aligned prompt prefix (cascade attention).

    `rows[g]` lists group g's rows of the decode batch (padded with -1, at most
    MAX_GROUP_MEMBERS); `prefix_lens[g]` is its shared prefix in tokens; `row_starts[b]` is
    where row b's own suffix begins (0 for rows in no group). `max_prefix_len` is a host
    bound on the prefix lengths (static under CUDA graphs) that sizes the kernel's grid.
    """

    rows: torch.Tensor  # [G, MAX_GROUP_MEMBERS] int64
    prefix_lens: torch.Tensor  # [G] int64
    row_starts: torch.Tensor  # [B] int64
    max_prefix_len: int


def pack_prefix_groups(groups: list[list[int]], prefix_lens: list[int], batch: int, device,
                       num_groups: int | None = None, max_prefix_len: int | None = None) -> PrefixGroups:
    """Tensors for `PrefixGroups` from host lists: the decode rows of each group and its shared
    prefix length (tokens). Groups longer than MAX_GROUP_MEMBERS are split. `num_groups` and
    `max_prefix_len` pad to static sizes (CUDA graphs)."""
    rows: list[list[int]] = []
    lens: list[int] = []
    starts = [0] * batch
    for members, length in zip(groups, prefix_lens):
        for i in range(0, len(members), MAX_GROUP_MEMBERS):
            chunk = members[i:i + MAX_GROUP_MEMBERS]
            rows.append(chunk + [-1] * (MAX_GROUP_MEMBERS - len(chunk)))
            lens.append(length)
            for row in chunk:
                starts[row] = length
    total = max(num_groups or 0, len(rows), 1)
    rows += [[-1] * MAX_GROUP_MEMBERS] * (total - len(rows))
    lens += [0] * (total - len(lens))
    return PrefixGroups(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        prefix_lens=torch.tensor(lens, dtype=torch.long, device=device),
        row_starts=torch.tensor(starts, dtype=torch.long, device=device),
        max_prefix_len=max_prefix_len if max_prefix_len is not None else max(lens),
    )


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged cache.

    Sequences are ordered so the first `num_decodes` have exactly one query token; the
    rest (prefill chunks, recomputation, forced tokens) have one or more.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [num_seqs] int64, context length after this step
    query_start_loc: list[int]  # num_seqs + 1 offsets into the flat batch (host)
    seq_lens_host: list[int]  # seq_lens as Python ints, to avoid device syncs
    num_decodes: int  # leading sequences with a single query token
    block_size: int
    # Static context width for decode attention (CUDA graphs need fixed shapes); None: the
    # longest decode context in this batch.
    decode_max_seq_len: int | None = None
    # Batched prefill (GPU): the cache slots of every prefill sequence's whole context,
    # concatenated, and the [prefill query tokens, context tokens] mask of who sees whom.
    prefill_context_slots: torch.Tensor | None = None
    prefill_mask: torch.Tensor | None = None
    # FlashDecoding++ unified max (phi) for decode attention, calibrated per model; None: the
    # synchronized softmax. Decode rows sharing a prompt prefix, for cascade attention.
    unified_max: float | None = None
    prefix_groups: PrefixGroups | None = None
    # While a list, prefill attention appends each query row's maximum score to it: the
    # statistics `ModelRunner.calibrate_unified_max` picks the unified max (phi) from.
    score_recorder: list[torch.Tensor] | None = None
    # prefill_mask narrowed to a sliding window, made once per step per window size
    # (every windowed layer of the step reuses it).
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor | FP8KVCache, v_cache: torch.Tensor | FP8KVCache,
    slot_mapping: torch.Tensor,
) -> None:
    """Store `key`/`value` ([num_tokens, num_kv_heads, head_dim]) into their slots (an fp8
    cache: quantized, with one scale per token and KV head)."""
    if isinstance(k_cache, FP8KVCache):
        blocks, positions = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
        for new, cache in ((key, k_cache), (value, v_cache)):
            codes, scales = quantize_fp8(new)
            cache.codes.view(torch.uint8)[blocks, positions] = codes.view(torch.uint8)
            cache.scales[blocks, positions] = scales  # (block, position): scales may be head-major
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_context(cache: torch.Tensor | FP8KVCache, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence, `[length, num_kv_heads, head_dim]`
    (fp32 values from an fp8 cache)."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = _rows(cache, block_table[:num_blocks])
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor | FP8KVCache,
    v_cache: torch.Tensor | FP8KVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    unified_max: float | None = None,
    prefix: PrefixGroups | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: `query` [B, H, D] -> [B, H, D].

    Contexts are gathered into a padded [B, L, Hkv, D] batch and masked past each
    sequence's length; grouped-query heads attend without repeating K/V. The exact
    softmax is what the kernel's unified max must reproduce, so `unified_max` changes
    nothing here; with `prefix`, the shared prefix and each row's suffix are attended
    separately and merged by log-sum-exp, the cascade kernel's math. `window`: each row
    sees only its last `window` positions.
    """
    batch, num_heads, head_dim = query.shape
    block_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:batch, :num_blocks]
    keys = _rows(k_cache, table).reshape(batch, num_blocks * block_size, num_kv_heads, head_dim)
    values = _rows(v_cache, table).reshape(batch, num_blocks * block_size, num_kv_heads, head_dim)
    # Scores, softmax and the weighted sum in fp32 from fp32 operands (SDPA in prefill and the
    # Triton kernel keep scores in fp32 too). An einsum in bf16 rounds each raw q.k to 8 bits
    # of mantissa before the scale: the default model's raw scores reach ~9,700 (its
    # attention-sink keys), where bf16's spacing is 64, i.e. 8 nats after the 1/8 scale, so
    # decode drifted from prefill (greedy "Hello" looped on one token; transformers did not).
    q = query.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bhgd,blhd->bhgl", q, keys.float()) * scale
    positions = torch.arange(num_blocks * block_size, device=query.device)
    invalid = positions[None, :] >= seq_lens[:batch, None]
    if window is not None:  # the query sits at seq_len - 1 and sees window positions back to itself
        invalid |= positions[None, :] < seq_lens[:batch, None] - window
    scores.masked_fill_(invalid[:, None, None, :], float("-inf"))
    if prefix is not None:
        return _cascade_merge(scores, values.float(), prefix.row_starts[:batch], positions).reshape(
            batch, num_heads, head_dim).to(query.dtype)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, values.float())
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


def _cascade_merge(scores: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, positions: torch.Tensor):
    """Attend the prefix [0, start) and the suffix [start, len) apart, merge by log-sum-exp."""
    in_prefix = (positions[None, :] < starts[:, None])[:, None, None, :]
    parts = []
    for mask in (in_prefix, ~in_prefix):
        part = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(part, dim=-1)  # -inf where a row has no prefix
        probs = torch.exp(part - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        parts.append((lse, torch.einsum("bhgl,blhd->bhgd", probs.to(values.dtype), values).float()))
    (lse_a, out_a), (lse_b, out_b) = parts
    total = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - total)[..., None]
    weight_b = torch.exp(lse_b - total)[..., None]
    return weight_a * out_a + weight_b * out_b


def _row_max_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    n, num_heads, head_dim = query.shape
    length, num_kv_heads = keys.shape[:2]
    q = query.float().view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("nhgd,lhd->nhgl", q, keys.float()) * scale
    query_pos = torch.arange(length - n, length, device=query.device)
    unseen = ~_causal_mask(query_pos, torch.arange(length, device=query.device), window)
    scores.masked_fill_(unseen[:, None, None, :], float("-inf"))
    return scores.amax(-1).flatten().cpu()


def _causal_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[queries, keys] True where the query may see the key: causal, and within `window`."""
    mask = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - window
    return mask


def prefill_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Queries are the last `n` of `L` context tokens: [n, H, D] x [L, Hkv, D] -> [n, H, D]."""
    n, num_heads, _ = query.shape
    length = keys.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)
    k = keys.to(query.dtype).transpose(0, 1).unsqueeze(0)
    v = values.to(query.dtype).transpose(0, 1).unsqueeze(0)
    if n == length and window is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # Query i sits at absolute position length - n + i and sees keys 0..that position
        # (only the last `window` of them in a sliding-window layer).
        query_pos = torch.arange(length - n, length, device=query.device)
        mask = _causal_mask(query_pos, torch.arange(length, device=query.device), window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


def window_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    """A batched-prefill mask narrowed to a sliding window. Each query row's visible keys
    are one contiguous run of the flat context ending at the query's own key (its
    sequence's context, causally), so keeping the last `window` of the run is the window."""
    index = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, index[None, :], -1).amax(dim=1, keepdim=True)
    return mask & (index[None, :] > last - window)


def batched_prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor | FP8KVCache, v_cache: torch.Tensor | FP8KVCache,
    context_slots: torch.Tensor, mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """All prefill chunks of a step in one attention call: the contexts are gathered into
    one flat sequence and a mask keeps each query to its own sequence, causally."""
    num_heads = query.shape[1]
    keys = _slot_rows(k_cache, context_slots).to(query.dtype)
    values = _slot_rows(v_cache, context_slots).to(query.dtype)
    group = num_heads // keys.shape[1]
    if group > 1:  # expand K/V heads so the memory-efficient kernel (which takes a mask) applies
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale,
    )
    return out.squeeze(0).transpose(0, 1)


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _decode_backend(query: torch.Tensor, k_cache: torch.Tensor | FP8KVCache, v_cache: torch.Tensor | FP8KVCache):
    """The Triton split-KV kernel on CUDA when it applies, the C++ operator on CPU when it
    applies, else the PyTorch reference."""
    if ATTENTION_BACKEND != "torch" and query.is_cuda:
        from thinkwise.kernels.triton_decode_attention import HAVE_TRITON, triton_decode_attention

        if HAVE_TRITON and _is_power_of_two(query.shape[-1]) and _is_power_of_two(k_cache.shape[1]):
            return triton_decode_attention
    if (ATTENTION_BACKEND != "torch" and not isinstance(k_cache, FP8KVCache) and k_cache.is_contiguous()
            and v_cache.is_contiguous() and cpu_decode_ops.applies(query, k_cache, v_cache)):
        return cpu_decode_ops.decode_attention
    return decode_attention


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor | FP8KVCache,
    v_cache: torch.Tensor | FP8KVCache,
    metadata: AttentionMetadata,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attend every query token ([num_tokens, H, D]) to its sequence's cached context.

    The new tokens' keys/values must already be in the cache (`write_kv_cache`). `window`
    is the layer's sliding window; None for a full-attention layer, which then runs exactly
    the code it ran before windows existed.
    """
    nd = metadata.num_decodes
    decoded = None
    if nd:
        decoded = _decode_backend(query, k_cache, v_cache)(
            query[:nd], k_cache, v_cache, metadata.block_tables, metadata.seq_lens,
            metadata.decode_max_seq_len or max(metadata.seq_lens_host[:nd]), scale,
            unified_max=metadata.unified_max,
            # Cascade attention reads a group's shared prefix once for all members; in a
            # window layer part of that prefix may lie outside some member's window, so
            # windowed layers attend each row's own context (the result is identical,
            # only the shared read is given up).
            prefix=metadata.prefix_groups if window is None else None,
            window=window,
        )
        if nd == metadata.num_seqs:  # a pure decode step: no output buffer to copy into
            return decoded
    output = torch.empty_like(query)
    if decoded is not None:
        output[:nd] = decoded
    starts = metadata.query_start_loc
    if metadata.prefill_context_slots is not None and nd < metadata.num_seqs:
        begin = starts[nd]
        mask = metadata.prefill_mask
        if window is not None:
            if window not in metadata.window_masks:
                metadata.window_masks[window] = window_mask(mask, window)
            mask = metadata.window_masks[window]
        output[begin:] = batched_prefill_attention(
            query[begin:], k_cache, v_cache, metadata.prefill_context_slots, mask, scale
        )
        return output
    for i in range(nd, metadata.num_seqs):
        begin, end = starts[i], starts[i + 1]
        length = metadata.seq_lens_host[i]
        table = metadata.block_tables[i]
        keys = gather_context(k_cache, table, length)
        values = gather_context(v_cache, table, length)
        if metadata.score_recorder is not None:
            metadata.score_recorder.append(_row_max_scores(query[begin:end], keys, scale, window))
        output[begin:end] = prefill_attention(query[begin:end], keys, values, scale, window)
    return output
