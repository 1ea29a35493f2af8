"""The hooks through which a ReftModel edits its base model, and the per-forward state they read.

Hooks. Each intervened (layer, component) gets one hook, registered once: a forward hook for ``*_output`` components
(on the layer, its attention or its MLP module), a forward pre-hook for ``*_input``. The module that holds the layer
list (the Llama's ``model``, GPT-2's ``transformer``) gets a pre-hook (a pass begins: generate's prompt-pass
detection) and a hook (a pass has returned: tie its state to its autograd graph, below). Not the outermost model: a
wrapper's ``generate`` may skip its own forward (PEFT's PeftModel calls the wrapped model's), yet every pass runs the
layers. Only these hooks are ever removed; nobody else's (DeepSpeed ZeRO-3's, accelerate's) are touched.

State. ``ForwardState`` holds what one forward's edits need, computed once before the base model runs: the positions
on each intervention's device, each intervention's edit prepared (its parameters checked and bound, R of the rotation
interventions computed in one batch, the dropout seed drawn), the resolved backends. A hook edits with
  * the state of the ReftModel forward or generate in progress (``InterventionHooks.running``);
  * nothing during a plain call of the base model;
  * during a backward, the state of the forward whose graph the backward is in: gradient checkpointing recomputes the
    checkpointed layers then (reentrant or not), after their forward has returned, and the recomputation must redo the
    same edits (positions, R, dropout masks).

Which forward a backward belongs to. When a grad-enabled forward of the base model returns, each of its outputs that
requires grad gets a tensor hook holding that forward's state (None for a plain call). The backward reaches an output
before any node of the graph that produced it, so the hook fires before any recomputation of that forward's layers
and makes its state the one recomputations use. The hook lives on the graph, so the state lives exactly as long as a
recomputation can still need it. The cases that a single "last grad-enabled forward" gets wrong:
  * two forwards before one backward (chosen/rejected pairs, a summed loss): of the ready nodes, torch's autograd
    engine runs the one created last (its ready queue orders by sequence number: torch/csrc/autograd/engine.cpp, torch
    2.13), so the later forward's graph is backpropagated, recomputations included, before the earlier forward's
    outputs are reached; their hook then switches the state;
  * a plain call of the base model between a forward and its backward (a reference model sharing the base): its own
    outputs carry no state, and the forward's backward still finds its own.
A forward under no_grad (evaluation, ``generate``) has no graph and leaves no hook. Each new forward of the base ends
the replay of the last backward's state; until then, a hooked submodule called directly (not through the base model)
with gradients on would replay it, and with gradients off never does.
Not covered: a base split over several devices given two forwards before one backward, where torch runs each device's
part of the backward on its own thread and the two graphs' recomputations may interleave.

Custom edits. A subclass of an intervention that overrides ``forward()`` (how pyreft users write their own edits)
runs its forward the way pyvene calls it: the selected rows [B, P, d] go through ``intervention(rows, None, None)``
and the result is scattered into a copy of the hidden state (``edit_with_own_forward``), instead of the fused op the
parent class would run.

Editing in place. Where a hook owns the hidden state, the edits write into it (``ops.low_rank_edit(in_place=True)``)
instead of copying it: on the Triton backend always, on the torch backend from 2^18 elements of hidden state (below,
autograd through its forward, which copies, costs the host less: ``ops.backend_torch``). A forward hook owns its
module's output when ``ops.is_sole_owner`` finds that nothing else refers to it (no view of it or view it is, no
autograd node that saved it, no other C++ holder) and it is none of the module's inputs (a module returning its input
unchanged). A pre-hook never owns its input: the caller still holds it (the residual stream, a checkpointed segment's
input that recomputation re-reads, the user's ``inputs_embeds``, the hidden states an ``output_hidden_states`` call
returns). Where the hook does not own the hidden state, the first edit at the site copies it and the site's further
edits write into that copy: one copy per site, not per intervention. A checkpoint recomputation may decide differently
than its forward did (copy or not): the values and what autograd saves are the same either way.

Generation. ``generate`` edits the prompt pass only: the hooks are active while the KV cache is empty and idle on the
decode steps, which read the edited prompt from the cache. Beam search and ``num_return_sequences`` expand the batch;
the positions are repeated to match.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from reft_fast import ops
from reft_fast.core.hf import component_module
from reft_fast.core.interventions import apply_prepared

__all__ = ["ForwardState", "InterventionHooks", "MultiForwardState", "MultiAdapterHooks", "SitePass",
           "is_prompt_pass", "cached_tokens", "runs_own_forward", "edit_with_own_forward"]

# Keyword names under which a module may receive its hidden states when they are not its first positional argument.
_HIDDEN_KWARGS = ("hidden_states", "x", "input")


@dataclass
class ForwardState:
    """What the hooks of one forward need, computed once before the base model runs."""

    locations: dict  # device -> int64 [n_interventions, B, P]
    edits: list  # per intervention: its prepared edit (``ReftIntervention.prepare``), None for a custom forward
    backends: tuple  # per intervention: the backend name resolved for its device
    expandable: bool = False  # generate: beams / returned sequences repeat each example
    prompt_length: int = 0  # generate: the sequence length of the prompt the locations index
    enabled: bool = True  # generate: False on decode steps (KV cache already holds the edited prompt)
    _expanded: dict = field(default_factory=dict)
    _rows: dict = field(default_factory=dict)  # device -> the locations cut per intervention, once per forward

    def __post_init__(self):
        # One unbind per device here, not an aten select in every hook call (built eagerly: a compiled hook only
        # indexes the tuple)
        self._rows = {device: locations.unbind(0) for device, locations in self.locations.items()}

    def positions(self, index: int, device: torch.device, batch_size: int) -> torch.Tensor:
        locations = self.locations[device]
        if locations.shape[1] == batch_size:
            return self._rows[device][index]
        factor = batch_size // locations.shape[1]
        if not self.expandable or factor * locations.shape[1] != batch_size:
            raise ValueError(f"the hidden states have batch {batch_size} but the locations have batch "
                             f"{locations.shape[1]}")
        key = (device, factor)
        if key not in self._expanded:
            self._expanded[key] = locations.repeat_interleave(factor, dim=1)
        return self._expanded[key][index]


class InterventionHooks:
    """The hooks of one ReftModel on its base ``model``: intervention ``i`` (of ``interventions``, in the order of the
    locations) edits component ``placements[i]`` = (layer index, component) of ``layers``."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, placements: Sequence[tuple[int, str]],
                 interventions: Sequence[nn.Module]):
        self.interventions = tuple(interventions)
        self.runs_own_forward = tuple(runs_own_forward(intervention) for intervention in self.interventions)
        self._register(model, layers, placements)

    def _register(self, model: nn.Module, layers: nn.ModuleList, placements: Sequence[tuple[int, str]]) -> None:
        """One hook per distinct placement; the hook of a site gets the indices of the placements there."""
        self.running: Optional[ForwardState] = None  # the ReftModel forward or generate in progress
        self._replaying: Optional[ForwardState] = None  # the forward whose graph the running backward is in
        sites: dict[tuple[int, str], list[int]] = {}
        for index, site in enumerate(placements):
            sites.setdefault(site, []).append(index)
        stack = _layer_stack_owner(model, layers)
        self._handles = [stack.register_forward_pre_hook(self._on_base_call, with_kwargs=True),
                         stack.register_forward_hook(self._on_base_return)]
        for (layer, component), indices in sites.items():
            module = component_module(layers[layer], component, layer)
            site = f"layer{layer}_{component}"
            edit = _own_code(self._edit, site)
            if component.endswith("_input"):
                hook = _own_code(self._input_hook, site)
                handle = module.register_forward_pre_hook(partial(hook, indices, edit), with_kwargs=True)
            else:
                hook = _own_code(self._output_hook, site)
                handle = module.register_forward_hook(partial(hook, indices, edit), with_kwargs=True)
            self._handles.append(handle)

    @contextlib.contextmanager
    def run(self, state: ForwardState) -> Iterator[None]:
        """Edit with ``state`` while the block runs (one ReftModel forward or generate)."""
        self.running = state
        try:
            yield
        finally:
            self.running = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------------------------------------------------------
    # The base model's own hooks
    # ----------------------------------------------------------------------------------------------------------------
    def _on_base_call(self, module, args, kwargs):
        self._replaying = None  # a new forward: the backward whose state was replayed has ended
        state = self.running
        if state is not None and state.expandable:
            state.enabled = is_prompt_pass(args, kwargs, state.prompt_length)
        return None

    def _on_base_return(self, module, args, output):
        if not torch.is_grad_enabled():
            return None
        marker = partial(self._replay, self.running)
        for tensor in _tensors_in(output):
            if tensor.requires_grad and tensor.grad_fn is not None:
                tensor.register_hook(marker)
        return None

    def _replay(self, state: Optional[ForwardState], grad: torch.Tensor) -> None:
        # The backward has reached an output of the forward that ran with ``state``: recomputations are that forward's.
        self._replaying = state

    # ----------------------------------------------------------------------------------------------------------------
    # The intervened modules' hooks
    # ----------------------------------------------------------------------------------------------------------------
    def _active_state(self) -> Optional[ForwardState]:
        if self.running is not None:
            return self.running if self.running.enabled else None
        # No forward of ours in progress: a checkpointed layer recomputed during a backward (always with gradients
        # on), or a plain forward of the base (which cleared the replay when it began).
        return self._replaying if torch.is_grad_enabled() else None

    def _edit(self, indices: list, h: torch.Tensor, state: ForwardState, owned: bool) -> torch.Tensor:
        for i in indices:
            if self.runs_own_forward[i]:
                h = edit_with_own_forward(self.interventions[i], h, state.positions(i, h.device, h.shape[0]))
                owned = False  # a slice of a new tensor (not contiguous): the next fused edit copies it
                continue
            edited = apply_prepared(h, state.positions(i, h.device, h.shape[0]), state.edits[i],
                                    backend=state.backends[i], validate=False, in_place=owned)
            owned = owned or edited is not h  # a copy the edit made is ours: the site's next edits write into it
            h = edited
        return h

    # The hooks of a site get its indices and its copy of ``_edit`` (``_own_code``).
    def _output_hook(self, indices, edit, module, args, kwargs, output):
        state = self._active_state()
        if state is None:
            return None
        inputs = (*args, *kwargs.values())
        if isinstance(output, torch.Tensor):
            return edit(indices, output, state, _owns_output(output, inputs))
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([edit(indices, output[0], state, _owns_output(output[0], inputs)),
                                 *output[1:]])
        raise TypeError(f"cannot intervene on the output of {type(module).__name__}: expected a tensor or a tuple "
                        f"starting with the hidden states, got {type(output).__name__}")

    def _input_hook(self, indices, edit, module, args, kwargs):
        state = self._active_state()
        if state is None:
            return None
        if args and isinstance(args[0], torch.Tensor):
            return (edit(indices, args[0], state, owned=False), *args[1:]), kwargs
        for name in _HIDDEN_KWARGS:
            if isinstance(kwargs.get(name), torch.Tensor):
                return args, {**kwargs, name: edit(indices, kwargs[name], state, owned=False)}
        raise TypeError(f"cannot find the hidden states among the inputs of {type(module).__name__} (first positional "
                        f"argument or one of {list(_HIDDEN_KWARGS)})")


@dataclass
class SitePass:
    """One edit of a site over the whole batch, each example with its own ReFT's step (several ReFTs in one batch):
    ``entries`` the steps (``ReftIntervention.edit_steps``), ``positions`` each entry's [B, P_k] positions,
    ``edit_index`` [B] the entry of each example (−1: its ReFT has no step here, or the example has no ReFT)."""

    entries: list
    positions: list
    edit_index: torch.Tensor
    backend: str
    _expanded: dict = field(default_factory=dict)

    def for_batch(self, batch_size: int, expandable: bool) -> tuple[list, torch.Tensor]:
        """(positions, edit_index) for hidden states of ``batch_size`` examples (beams repeat each example)."""
        own = self.edit_index.shape[0]
        if batch_size == own:
            return self.positions, self.edit_index
        factor = batch_size // own
        if not expandable or factor * own != batch_size:
            raise ValueError(f"the hidden states have batch {batch_size} but adapter_names has {own} entries")
        if factor not in self._expanded:
            self._expanded[factor] = ([p.repeat_interleave(factor, dim=0) for p in self.positions],
                                      self.edit_index.repeat_interleave(factor))
        return self._expanded[factor]


@dataclass
class MultiForwardState:
    """What the hooks of a forward with several ReFTs in the batch need: the passes of each hooked site, in the
    order of ``MultiAdapterHooks``' sites; ``expandable``, ``prompt_length``, ``enabled`` as in ForwardState."""

    passes: list
    expandable: bool = False
    prompt_length: int = 0
    enabled: bool = True


class MultiAdapterHooks(InterventionHooks):
    """Hooks at the union of the sites of several ReFTs, editing each example with its own ReFT (inference only).

    Registered for one ReftModel forward or generate with ``adapter_names`` and removed after it, so that a model
    serving one ReFT at a time runs no hook of these."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, sites: Sequence[tuple[int, str]]):
        self.interventions, self.runs_own_forward = (), ()
        self._register(model, layers, sites)

    def _edit(self, indices: list, h: torch.Tensor, state: MultiForwardState, owned: bool) -> torch.Tensor:
        for site in indices:
            for site_pass in state.passes[site]:
                positions, edit_index = site_pass.for_batch(h.shape[0], state.expandable)
                h = ops.multi_low_rank_edit(h, positions, edit_index, site_pass.entries, backend=site_pass.backend,
                                            validate=False)
        return h


def runs_own_forward(intervention: nn.Module) -> bool:
    """Whether ``intervention``'s class, or a parent outside reft_fast, overrides ``forward()``: a user's custom edit,
    which must run instead of the fused op of the reft_fast class it derives from."""
    owner = next(cls for cls in type(intervention).__mro__ if "forward" in vars(cls))
    return owner.__module__.partition(".")[0] not in ("reft_fast", "torch")


def edit_with_own_forward(intervention: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Edit the rows ``positions`` [B, P] (−1 = none) of h [B, T, d] with ``intervention``'s own forward, called as
    pyvene calls it: ``intervention(rows, None, None)`` on the selected rows [B, P, d] (a −1 slot passes a row of
    zeros), the result (a tensor, or pyvene's output object holding one as ``.output``) scattered into a copy of h."""
    batch, seq_len, dim = h.shape
    # One extra row of zeros stands for every −1 slot: it is what those slots read, and where their result goes.
    padded = torch.cat([h, h.new_zeros(batch, 1, dim)], dim=1)
    index = torch.where(positions >= 0, positions, seq_len).unsqueeze(-1).expand(-1, -1, dim)
    rows = padded.gather(1, index)
    edited = intervention(rows, None, None)
    edited = getattr(edited, "output", edited)
    if not isinstance(edited, torch.Tensor) or edited.shape != rows.shape:
        raise TypeError(f"{type(intervention).__name__}.forward must return the edited rows, a tensor of shape "
                        f"{list(rows.shape)} like its input, got "
                        f"{list(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__}")
    return padded.scatter(1, index, edited.to(h.dtype))[:, :seq_len]


def _own_code(method, site: str):
    """``method`` bound to the same object, running a copy of its code object named after ``site``.

    Under ``model.compile`` each hook runs as a frame of its own (and ``_edit`` too, where dynamo gives up on the
    layer around it: generation with a KV cache), and dynamo keeps one cache of compiled versions per code object,
    searched entry by entry on every call. With one code object for all sites it compiled a version per site up to its
    recompile limit (8, torch 2.13), ran the hooks of the later layers eager (``fullgraph=True`` raised) and searched
    the versions on every call: on the CPU (2026-11-29, 32 intervened layers) the compiled step then cost 2.5× the
    eager step's host time per intervention. A copy per site keeps one entry per cache."""
    function = method.__func__
    code = function.__code__.replace(co_name=f"{function.__name__}_{site}")
    copy = types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
    return types.MethodType(copy, method.__self__)


def _layer_stack_owner(model: nn.Module, layers: Sequence[nn.Module]) -> nn.Module:
    """The submodule of ``model`` holding the nn.ModuleList of ``layers`` (given as that list or a tuple of its
    blocks): every pass of the base goes through its forward."""
    first = layers[0]
    owner = next((module for module in model.modules() for child in module.children()
                  if isinstance(child, nn.ModuleList) and any(block is first for block in child)), None)
    if owner is None:
        raise ValueError(f"the layer list is not a submodule of {type(model).__name__}")
    return owner


def _owns_output(hidden: torch.Tensor, inputs: tuple) -> bool:
    """Whether a forward hook may write into its module's output ``hidden`` (see "Editing in place" above).

    Compiled code traces the functional op instead (the checks read reference counts, which tracing cannot).

    Once ``is_sole_owner`` holds, no other tensor shares ``hidden``'s storage (a view of an input, or an input viewing
    it, would count as a second user of the storage), so the only input it can be is itself: an identity test, not a
    storage handle per input."""
    if torch.compiler.is_compiling() or not ops.is_sole_owner(hidden):
        return False
    return not any(x is hidden for x in inputs)


def _tensors_in(output) -> Iterator[torch.Tensor]:
    """The tensors of a model output: a tensor, or nested in a ModelOutput / dict / tuple / list."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):  # transformers' ModelOutput is an OrderedDict
        for value in output.values():
            yield from _tensors_in(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors_in(value)


def is_prompt_pass(args: tuple, kwargs: dict, prompt_length: int) -> bool:
    """Whether a forward call made by ``generate`` processes the prompt (to be edited) or decodes from the KV cache.

    The cache is recognized by what it is, not by the keyword it arrives under: transformers renamed it from
    ``past_key_values`` to ``cache`` in its generate loop (5.24.0, seen 2026-11-28), and a keyword-based check then
    edited every decode step. Without a recognizable cache (``use_cache=False``, or a cache of a kind unknown here),
    each call's input length tells: a cacheless step re-reads the whole sequence (at least the prompt), a decode step
    reads fewer tokens than the prompt.
    """
    for value in (*kwargs.values(), *args):
        cached = cached_tokens(value)
        if cached is not None:
            return cached == 0
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if inputs is None:
        inputs = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return inputs is None or inputs.shape[1] >= prompt_length


def cached_tokens(value) -> Optional[int]:
    """Tokens held by ``value`` if it is a KV cache (a transformers Cache, or legacy per-layer (key, value) tuples)."""
    if callable(getattr(value, "get_seq_length", None)):
        return int(value.get_seq_length())
    if (isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and len(value[0]) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in value[0])):
        return int(value[0][0].shape[-2])
    return None
