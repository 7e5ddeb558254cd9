"""Fold a key site's row terms (BitFit's bias delta, IA3's output scale) out of the key: one pass fewer over the
[batch, seq, hidden] key activation per layer.

An attention's scores are `q_i . k_j` per head (then scaled, masked and softmaxed over the keys j), and a query
attends only to keys of its own row's task (padded: one task a row; packed: the block-diagonal mask keeps each
request to its own tokens), so with a row's terms `k' = (k + db) * l`:

- `q_i . (k_j * l) = (q_i * l) . k_j`: the scale moves to the query's output, feature for feature (heads split in
  the same order on both sides);
- `q_i . (db * l)` is the same for every key j a query sees, and softmax ignores a constant added to all of a row's
  scores: the bias delta drops out, exactly (up to rounding, which only shrinks).

The pass folds only where that holds: the key and the query reach `scaled_dot_product_attention` (no dropout, no
GQA) through head splits of one shape with one reader at every step, the key's output is the site's linear followed
by its row terms alone (no LoRA or sparse delta there), and, where the key has an IA3 scale, the query's last op can
carry it: a `linear_delta` / `lora_delta` (its `out_scale`), or a `bias_delta` / unscaled `row_delta` (which becomes
a `row_delta` with the scale). Where the query has no task op the key keeps its terms (a scale op at the query would
cost the pass it saves); a key with a bias delta alone loses it whatever the query has.

Tables: the key's IA3 table is read at the query; its bias delta table stays a program input, unread (a task with a
key bias still fills it, so the task set and its tables are as planned), and `ctx.dropped_key_bias` records the site
for check_graph."""

from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.fx.node import Argument

from pets_compiler.passes.attention_heads import ATEN, same_shape, sdpa_dropout, split_source
from pets_compiler.passes.context import CompileContext, PassResult, cleanup, op_target
from pets_compiler.passes.fuse_row_terms import OUT_SCALE


def _key_terms(node: Node, task_ids: Node, linears: set[Node]) -> tuple[Node, Argument, Argument] | None:
    """(the key's linear, bias table or None, scale table or None) where `node` is the linear's row terms alone."""
    bias, scale, row = op_target("bias_delta"), op_target("scale"), op_target("row_delta")
    y = node.args[0] if node.args else None
    if not isinstance(y, Node) or y not in linears or node.args[1] is not task_ids:
        return None
    if node.target is bias:
        return y, node.args[2], None
    if node.target is scale:
        return y, None, node.args[2]
    if node.target is row and node.args[4] is None:
        return y, node.args[2], node.args[3]
    return None


def _scaled_query(gm: GraphModule, q: Node, task_ids: Node, dl: Argument, linears: set[Node]) -> Node | None:
    """q's op with the scale (1 + dl) added, inserted before q's one reader, or None where q is its site's linear
    itself (a scale op there would cost the pass it saves at the key) or its op cannot carry one."""
    bias, row = op_target("bias_delta"), op_target("row_delta")
    lora, linear = op_target("lora_delta"), op_target("linear_delta")
    if q in linears or not q.args or q.args[0] not in linears or task_ids not in q.args[1:3]:
        return None
    if q.target is linear and (len(q.args) <= OUT_SCALE or q.args[OUT_SCALE] is None):
        return gm.graph.call_function(linear, (*q.args[:OUT_SCALE], dl))
    if q.target is lora:
        return gm.graph.call_function(linear, (*q.args, None, dl))
    if q.target is bias:
        return gm.graph.call_function(row, (*q.args, dl, None))
    if q.target is row and q.args[3] is None and q.args[4] is None:
        return gm.graph.call_function(row, (q.args[0], q.args[1], q.args[2], dl, None))
    return None


def fold_key_terms(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """sdpa(split(q), split(terms(k, t, db, l - 1))) -> sdpa(split(q * l), split(k)) at every attention."""
    task_ids = ctx.require_task_ids()
    site_of = {node: site for site, node in ctx.linear_nodes.items()}
    linears = set(site_of)
    folded = scales = 0
    for sdpa in [n for n in gm.graph.nodes if n.target is ATEN.scaled_dot_product_attention.default]:
        q_arg, k_arg = sdpa.args[:2]
        if sdpa_dropout(sdpa) != 0.0 or sdpa.kwargs.get("enable_gqa", False):
            continue
        if not isinstance(q_arg, Node) or not isinstance(k_arg, Node) or q_arg is k_arg:
            continue
        q_found, k_found = split_source(q_arg), split_source(k_arg)
        if q_found is None or k_found is None or not same_shape(q_found[1], k_found[1]):
            continue
        (q, _), (k_out, _) = q_found, k_found
        terms = _key_terms(k_out, task_ids, linears)
        if terms is None:
            continue
        k_linear, db, dl = terms
        new_q = None
        if dl is not None:
            (reader,) = q.users
            with gm.graph.inserting_before(reader):
                new_q = _scaled_query(gm, q, task_ids, dl, linears)
            if new_q is None:
                continue  # the scale stays at the key, with its bias delta
        if new_q is not None:
            q.replace_all_uses_with(new_q)
            gm.graph.erase_node(q)
            scales += 1
        k_out.replace_all_uses_with(k_linear)
        gm.graph.erase_node(k_out)
        if db is not None:
            ctx.dropped_key_bias.add(site_of[k_linear])
        folded += 1
    if folded:
        cleanup(gm)
    detail = f"folded {folded} key sites' row terms out of the key ({scales} IA3 scales moved to the query)"
    return PassResult("fold_key_terms", folded, detail)
