"""Splitting a Keras model into modules: the sub-graphs between named layers.

A split point is a layer whose output every path from the model's input to its
output goes through, and which no other tensor crosses: no layer after it may read
a tensor computed before it (a skip connection spanning it). Then the model is the
chain module_1 -> module_2 -> ... -> module_K, and running the modules one after the
other computes the very same operations on the very same weights as the model: the
modules are `keras.Model`s over the model's own layers, not copies.

`split_model` splits at named layers; `balanced_split_points` picks K-1 split
points for K modules of about equal depth (conv and dense layers) or activation
size. Errors are `SplitError`s naming the layer and the connection.
"""

import dataclasses

import keras
import numpy as np

from kgreedy.base.errors import KgreedyError


class SplitError(KgreedyError):
    """A model cannot be split where it was asked to (exit status 2)."""


@dataclasses.dataclass
class _Graph:
    """The model's nodes in topological order, each as (layer, input ids, output ids)."""

    model: keras.Model
    input_id: int
    output_id: int
    nodes: list      # [(layer, [input tensor ids], [output tensor ids])]
    producer: dict   # tensor id -> index of the node that computes it
    tensors: dict    # tensor id -> KerasTensor

    def node_of(self, name, key):
        """Index of the one node of layer `name`."""
        found = [i for i, (layer, _, _) in enumerate(self.nodes) if layer.name == name]
        if not found:
            raise SplitError(key, f"no layer of that name in model {self.model.name!r} "
                             "(its layers: " + _some_names(self.nodes) + ")", name)
        if len(found) > 1:
            raise SplitError(key, f"layer {name!r} is used {len(found)} times in the "
                             "model; a split point must be used once", name)
        return found[0]

    def ancestors(self, index):
        """Indices of node `index` and every node it depends on."""
        seen, stack = set(), [index]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.producer[t] for t in self.nodes[i][1] if t in self.producer)
        return seen

    def crossing(self, index):
        """(tensor producer name, consumer name) of a connection that spans the
        output of node `index`, or None when it is a clean split point."""
        before = self.ancestors(index)
        (cut,) = self.nodes[index][2]
        for i, (layer, inputs, _) in enumerate(self.nodes):
            if i in before:
                continue
            for t in inputs:
                if t == cut:
                    continue
                if t == self.input_id or self.producer.get(t) in before:
                    source = (self.nodes[self.producer[t]][0].name if t in self.producer
                              else "the model input")
                    return source, layer.name
        return None


def _some_names(nodes, limit=8):
    names = [layer.name for layer, _, _ in nodes]
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit // 2]) + ", ..., " + ", ".join(names[-limit // 2:])


def _graph(model, key):
    """The single-input, single-output graph of a functional or Sequential model."""
    if not isinstance(model, keras.Model):
        raise SplitError(key, "expected a Keras model", type(model).__name__)
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise SplitError(key, f"model {model.name!r} is not a functional or built "
                         "Sequential model (a subclassed model has no graph to split); "
                         "give kgreedy its layers as modules instead", model.name)
    if len(inputs) != 1 or len(outputs) != 1:
        raise SplitError(key, f"model {model.name!r} has {len(inputs)} inputs and "
                         f"{len(outputs)} outputs; kgreedy splits a chain from one "
                         "image input to one output", model.name)
    nodes, producer, tensors, order = [], {}, {}, {}
    input_id = id(inputs[0])

    def visit(tensor):
        # Iterative post-order walk from the output back to the input.
        stack = [(tensor, False)]
        while stack:
            t, expanded = stack.pop()
            tid = id(t)
            tensors[tid] = t
            if tid == input_id or tid in producer:
                continue
            history = getattr(t, "_keras_history", None)
            if history is None or history.operation is None:
                raise SplitError(key, f"model {model.name!r} reads a tensor that does "
                                 "not come from its input", model.name)
            node = history.operation._inbound_nodes[history.node_index]
            if node.is_input:
                continue
            if expanded:
                if id(node) in order:
                    producer[tid] = order[id(node)]
                    continue
                ins = [x for x in node.input_tensors]
                for x in ins:
                    tensors[id(x)] = x
                order[id(node)] = len(nodes)
                nodes.append((node.operation, [id(x) for x in ins],
                              [id(x) for x in node.output_tensors]))
                for x in node.output_tensors:
                    producer[id(x)] = order[id(node)]
                    tensors[id(x)] = x
                continue
            stack.append((t, True))
            stack.extend((x, False) for x in node.input_tensors)

    visit(outputs[0])
    graph = _Graph(model, input_id, id(outputs[0]), nodes, producer, tensors)
    _check_single_input(graph, key)
    return graph


def _check_single_input(graph, key):
    """Refuses a graph that some layer enters with a second entry point."""
    for layer, inputs, _ in graph.nodes:
        for t in inputs:
            if t != graph.input_id and t not in graph.producer:
                raise SplitError(key, f"layer {layer.name!r} of model "
                                 f"{graph.model.name!r} reads a tensor that is not "
                                 "computed from the model input", layer.name)


def _cut_tensor(graph, index, name, key):
    """The output of node `index`, checked to be a clean feature-map split point."""
    layer, _, outs = graph.nodes[index]
    if len(outs) != 1:
        raise SplitError(key, f"layer {name!r} has {len(outs)} outputs; a split point "
                         "must have one", name)
    crossing = graph.crossing(index)
    if crossing is not None:
        source, consumer = crossing
        raise SplitError(key, f"layer {name!r} is not a split point: {consumer!r} reads "
                         f"{source!r}, which comes before it (a skip connection or "
                         "branch spans it)", name)
    tensor = graph.tensors[outs[0]]
    if len(tensor.shape) != 4:
        raise SplitError(key, f"layer {name!r} outputs shape {tuple(tensor.shape)}, "
                         "not a feature map (batch, height, width, channels)", name)
    return tensor


def split_points(model, key="split_at"):
    """Names of every layer the model can be split at (before its last layer),
    in order: the outputs through which all paths pass and that no skip spans.

    Raises:
        SplitError: the model is not a single-input, single-output graph.
    """
    graph = _graph(model, key)
    names = []
    for i, (layer, _, outs) in enumerate(graph.nodes):
        if outs == [graph.output_id] or len(outs) != 1:
            continue
        if len(graph.tensors[outs[0]].shape) != 4 or graph.crossing(i) is not None:
            continue
        if sum(1 for other, _, _ in graph.nodes if other is layer) == 1:
            names.append(layer.name)
    return names


def split_model(model, at, *, key="split_at", name_format="stage{}_module"):
    """Splits `model` at the layers named in `at` into len(at)+1 modules.

    Module j maps the output of split point j-1 (the model input for j=1) to the
    output of split point j (the model output for the last). Modules share the
    model's layers and weights.

    Args:
        model: a functional or built Sequential `keras.Model`, one input and one
            output.
        at: names of split layers, in the order the data passes them.
        key: the name errors give the split points (`model.split_at`).
        name_format: names of the modules, formatted with j = 1..K.

    Returns:
        A list of `keras.Model`s.

    Raises:
        SplitError: an unknown or repeated layer, a layer that a connection spans,
            split points out of order, or a model that is not a chain there.
    """
    graph = _graph(model, key)
    at = list(at)
    if len(set(at)) != len(at):
        raise SplitError(key, "names a layer twice", at)
    cuts, previous, previous_name = [], set(), None
    for i, name in enumerate(at):
        index = graph.node_of(name, f"{key}[{i}]")
        tensor = _cut_tensor(graph, index, name, f"{key}[{i}]")
        if graph.nodes[index][2] == [graph.output_id]:
            raise SplitError(f"{key}[{i}]", f"{name!r} is the model's last layer; its "
                             "output ends the last module already", name)
        before = graph.ancestors(index)
        if not previous < before:
            raise SplitError(f"{key}[{i}]", f"{name!r} comes before {previous_name!r} in "
                             "the model; list the split points in the order the data "
                             "passes them", at)
        cuts.append(tensor)
        previous, previous_name = before, name
    ends = [model.inputs[0], *cuts, model.outputs[0]]
    return [keras.Model(ends[j], ends[j + 1], name=name_format.format(j + 1))
            for j in range(len(ends) - 1)]


def _node_costs(graph, balance):
    """Per node: conv and dense layers it runs (`layers`) or the activation values
    it writes (`memory`)."""
    costs = []
    for layer, _, outs in graph.nodes:
        if balance == "memory":
            costs.append(sum(int(np.prod([d or 1 for d in graph.tensors[t].shape[1:]]))
                             for t in outs))
        else:
            costs.append(count_weighted_layers(layer))
    return costs


def count_weighted_layers(layer):
    """Layers with a kernel (conv, dense) in `layer`, nested models included."""
    inner = getattr(layer, "layers", None)
    if inner:
        return sum(count_weighted_layers(x) for x in inner)
    return 1 if getattr(layer, "kernel", None) is not None else 0


def balanced_split_points(model, modules, balance="layers", key="model.modules"):
    """K-1 split points that cut `model` into K modules of balanced cost.

    The cost of a module is its conv and dense layers (`balance="layers"`) or the
    activation values its layers write per example (`"memory"`, what a stage keeps
    for its backward pass). The split points minimise the largest module's cost
    among all clean split points (`split_points`).

    Raises:
        SplitError: the model has fewer than K-1 split points.
    """
    graph = _graph(model, key)
    if modules == 1:
        return []
    names = split_points(model, key)
    if len(names) < modules - 1:
        raise SplitError(key, f"model {model.name!r} has {len(names)} split points, so "
                         f"at most {len(names) + 1} modules", modules)
    costs = _node_costs(graph, balance)
    index = {layer.name: i for i, (layer, _, _) in enumerate(graph.nodes)}
    # Of split points in a row (conv, BN, ReLU; add, ReLU), only the last: a module
    # should end after the weightless layers that finish its last operation (the
    # model's last layer, a ReLU after an add, ends the last module too).
    names = [n for n, after in zip(names, names[1:] + [graph.nodes[-1][0].name])
             if index[after] != index[n] + 1
             or count_weighted_layers(graph.nodes[index[after]][0])]
    if len(names) < modules - 1:
        raise SplitError(key, f"model {model.name!r} has {len(names)} places to split "
                         f"between its layers, so at most {len(names) + 1} modules",
                         modules)
    prefix = np.cumsum([0] + costs)
    # positions: cumulative cost up to and including each candidate's node
    cum = [float(prefix[index[n] + 1]) for n in names]
    total = float(prefix[-1])
    chosen = _min_max_partition(cum, total, modules - 1)
    return [names[i] for i in chosen]


def _min_max_partition(cum, total, cuts):
    """Indices of `cuts` increasing positions in `cum` minimising the largest of the
    segments they cut [0, total] into (dynamic programming; ties go to the earlier
    cut, so the result is deterministic)."""
    m = len(cum)
    inf = float("inf")
    # best[c][i]: the smallest largest segment with c+1 cuts, the last at i.
    best = [[cum[i] for i in range(m)]]
    back = [[-1] * m]
    for c in range(1, cuts):
        row, link = [inf] * m, [-1] * m
        for i in range(c, m):
            for p in range(c - 1, i):
                value = max(best[c - 1][p], cum[i] - cum[p])
                if value < row[i]:
                    row[i], link[i] = value, p
        best.append(row)
        back.append(link)
    finals = [max(best[cuts - 1][i], total - cum[i]) for i in range(m)]
    i = int(np.argmin(finals))
    chosen = []
    for c in range(cuts - 1, -1, -1):
        chosen.append(i)
        i = back[c][i]
    return sorted(chosen)


def trunk_and_top(model, key="model"):
    """Splits a classifier into its feature-map trunk and its own top.

    The trunk ends at the last clean split point whose output is a feature map; the
    top (pooling, dense layers) maps it to the model's output. A model whose
    output is already a feature map has no top (None).

    Returns:
        (trunk, top): `keras.Model`s sharing the model's layers; top may be None.

    Raises:
        SplitError: the output is not a feature map and no split point leads to it.
    """
    if len(model.outputs[0].shape) == 4:
        return model, None
    names = split_points(model, key)
    if not names:
        raise SplitError(key, f"model {model.name!r} outputs shape "
                         f"{tuple(model.outputs[0].shape)} and has no feature-map layer "
                         "that all paths pass", model.name)
    # The tensor in this model's graph: a nested model's own `.output` belongs to
    # the graph it was built in, not to this one.
    graph = _graph(model, key)
    (end_id,) = graph.nodes[graph.node_of(names[-1], key)][2]
    end = graph.tensors[end_id]
    # The trunk keeps the model's name: errors about its split points name the
    # model the user gave.
    return (keras.Model(model.inputs[0], end, name=model.name),
            keras.Model(end, model.outputs[0], name=f"{model.name}_top"))


def split_trunk(trunk, at=None, modules=None, balanced_memory=False, *,
                at_key="split_at", modules_key="modules"):
    """Modules of a feature-map trunk (`trunk_and_top`): split at the layers `at`,
    or into `modules` of balanced depth (of balanced activation size with
    `balanced_memory`).

    Raises:
        SplitError: as `balanced_split_points` and `split_model`.
    """
    if at is None:
        at = balanced_split_points(trunk, modules,
                                   "memory" if balanced_memory else "layers",
                                   key=modules_key)
        at_key = modules_key
    return split_model(trunk, at, key=at_key)


def own_classifier_problem(top, num_classes):
    """Why a split model's own top cannot be the last head, or None.

    Returns:
        None; ("none",) without a classifier; ("outputs", units) when it has not
        `num_classes` outputs; ("softmax", layer name) when its last layer gives
        probabilities, not logits.
    """
    if top is None:
        return ("none",)
    units = top.outputs[0].shape[-1]
    if units != num_classes:
        return ("outputs", units)
    last = top.layers[-1]
    if (isinstance(last, keras.layers.Softmax)
            or getattr(last, "activation", None) is keras.activations.softmax):
        return ("softmax", last.name)
    return None


def layer_span(module):
    """(first layer name, last layer name, layers) of a module, inputs excluded."""
    layers = [x for x in getattr(module, "layers", [module])
              if not isinstance(x, keras.layers.InputLayer)]
    if not layers:
        return (module.name, module.name, 0)
    return layers[0].name, layers[-1].name, len(layers)
