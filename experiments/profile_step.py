"""Where the device time of one train step / one sampling step goes: a per-category breakdown from one trace.

    python experiments/profile_step.py --config=configs/cifar10.py --what=train,sample --dtype=bfloat16 \
        --out=profile.json                  # train at batch 128, sampling at batch 1024, 5 steps each
    python experiments/profile_step.py --smoke --out=/tmp/profile.json      # seconds on a CPU

What runs (the code the benchmarks time, bench_train.py / bench_sample.py):
  * train: `train.create_train_state` + `train.make_train_step` (K = 1, state donated) on synthetic images
    (`bench_train.synthetic_batches`) already on the device; compile, 2 warm-up steps, --steps synced steps
    timed without the profiler, then --steps synced steps (each up to `block_until_ready`) traced with
    `jax.profiler.start_trace` / `stop_trace`.
  * sample: `sample_mode.make_sample_batch_fn` (quantize=False) with sampler 'ancestral' and num_steps = --steps
    (the paper's ancestral loop on respaced timesteps, one network evaluation per step, as bench_sample.py);
    compile, one warm-up call, one call timed without the profiler, one call traced. "Per step" = per
    network evaluation (the x_T draw, under 1/steps of a step, is included).

How the trace is read (`jax.profiler.ProfileData` on the xplane.pb that stop_trace writes; no xprof needed):
  * Which events count. Where device planes exist ('/device:GPU:N' / '/device:TPU:N'), every event on their
    stream lines ('Stream #...') counts: kernels, memcpys, memsets. Lines derived from annotations ('XLA Ops',
    'XLA Modules', 'Steps', ...) repeat the same time, so they are summed only where a plane has no stream line
    at all ('XLA Ops' then); 'CUPTI overhead' and all other lines are listed in the JSON (`lines`) with their
    event counts, never summed. Without device planes (XLA:CPU), the '/host:CPU' events that carry an
    'hlo_op' stat count (thunk executions on the runtime's threads); the other host events (Python frames,
    thread-pool and executor markers) enclose them and are skipped, their count reported.
  * Containers are not double counted: an event that encloses the next event of its line (a CUDA-graph span
    around its kernels, a CPU while/call thunk around its body) and, on the CPU, an event of a while, call or
    conditional instruction, is listed under `events.containers` and left out of the sums.
  * Attribution. An event's 'hlo_op' stat names an instruction of `compiled.as_text()` (parsed here: opcode,
    custom-call target, fusion kind, called computations, metadata op_name and Python stack frame). Events of
    other modules go to 'other module: <name>'. With XLA command buffers (CUDA graphs) kernels may carry the
    command buffer's instruction instead of their own; they are then matched by kernel name (XLA names a
    fusion's kernel after the instruction, '.' -> '_'), else by library kernel-name patterns (cuDNN
    fprop/dgrad/wgrad, cuBLAS/CUTLASS gemm, fmha); events that match nothing, and events without an 'hlo_op',
    go to 'unattributed: <event name>' (an event without 'hlo_op' is attributed only when its name is exactly
    an instruction's kernel name). Every counted event lands in exactly one category, so the categories
    add up to the kernel time; `events.by_attribution` says how each event was attributed.
  * Categories (first rule that matches; fusions are judged by all the instructions they fuse):
    conv forward / backward-data / backward-filter (cuDNN targets '__cudnn$convForward' ('...BiasActivation
    Forward'), '__cudnn$convBackwardInput', '__cudnn$convBackwardFilter'; a plain 'convolution' is a filter
    gradient when its window is larger than its output's spatial extent, a data gradient when its op_name lies
    in the backward pass, 'transpose(...)', else forward); attention (cuDNN fmha custom calls, or the ops of
    an attention block other than its GroupNorm and q/k/v/proj_out projections: QK^T, softmax, AV); matmul /
    gemm (dot, cuBLAS/cuBLASLt custom calls, Triton/cuDNN gemm fusions); optimizer + EMA (an optax source
    frame, or a source line that updates the EMA / optimizer state); GroupNorm + swish (a norm module or
    silu/swish in the op_name); random numbers + dropout (threefry / random primitives, Dropout modules);
    data movement (ops that only copy, transpose, cast, reshape, slice, pad or concatenate); other.
  * Times per step = summed event time / profiled steps / devices. "kernel ms" is that sum; "busy ms" is the
    union of the counted events' intervals (smaller where events overlap: XLA:CPU runs thunks on several
    threads, a GPU may run streams concurrently); busy fraction = busy ms / wall ms of the traced steps (what
    is not busy is the launch / host gap, inflated somewhat by the profiler itself; the untraced wall time is
    reported next to it).
  * FLOPs: XLA's cost analysis of the whole step (`bench_train.compiled_flops`; a loop body counts once) and,
    per category, 2 x multiply-adds of every convolution and dot computed from the HLO shapes (padding
    positions included), summed over the distinct instructions seen in the trace, i.e. assuming each runs
    once per step (true for the train step and for the sampler's loop body); TFLOP/s = those FLOPs / the
    category's kernel time.

The trace stays in --trace_dir (default: profile_traces/ next to --out) for a look in xprof / TensorBoard.
"""
import argparse
import collections
import dataclasses
import datetime
import glob
import json
import linecache
import os
import re
import sys
import tempfile
import time
from typing import Any, Iterable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sample  # pylint: disable=wrong-import-position  (the sampler's config)
import bench_train  # pylint: disable=wrong-import-position  (config loading, synthetic data, device info)

import jax  # pylint: disable=wrong-import-position,g-bad-import-order
import numpy as np  # pylint: disable=wrong-import-position,g-bad-import-order

from ddpm_jax.models import params as params_lib  # pylint: disable=wrong-import-position
from ddpm_jax.models import unet  # pylint: disable=wrong-import-position
from ddpm_jax import parallel, train  # pylint: disable=wrong-import-position
from ddpm_jax.evaluation import common  # pylint: disable=wrong-import-position
from ddpm_jax.evaluation import sample as sample_mode  # pylint: disable=wrong-import-position

WHATS = ('train', 'sample')
DEFAULT_BATCH = {'train': 128, 'sample': 1024}
SMOKE_BATCH = 8

CONV_FORWARD = 'conv forward'
CONV_BACKWARD_DATA = 'conv backward-data'
CONV_BACKWARD_FILTER = 'conv backward-filter'
ATTENTION = 'attention (QK^T, softmax, AV)'
GEMM = 'matmul / gemm'
OPTIMIZER = 'optimizer + EMA'
NORM_ACTIVATION = 'GroupNorm + swish'
RANDOM = 'random numbers + dropout'
DATA_MOVEMENT = 'data movement (copy, transpose, cast, concat)'
OTHER = 'other (elementwise, reductions, loss)'
CATEGORIES = (CONV_FORWARD, CONV_BACKWARD_DATA, CONV_BACKWARD_FILTER, ATTENTION, GEMM, OPTIMIZER,
              NORM_ACTIVATION, RANDOM, DATA_MOVEMENT, OTHER)
OTHER_MODULE = 'other module: '
UNATTRIBUTED = 'unattributed: '

CONTAINER_OPCODES = frozenset({'while', 'call', 'conditional'})
STRUCTURAL_OPCODES = frozenset({'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'})
DATA_MOVEMENT_OPCODES = frozenset({
    'copy', 'copy-start', 'copy-done', 'transpose', 'convert', 'bitcast-convert', 'reshape', 'broadcast',
    'slice', 'dynamic-slice', 'dynamic-update-slice', 'concatenate', 'pad', 'reverse'})
GEMM_TARGETS = ('__cublas$gemm', '__cublas$lt$matmul', '__cublas$lt', 'cublas')
RANDOM_PRIMITIVES = ('threefry', '_bernoulli', '_uniform', '_normal', '_randint', 'random_bits', 'random_split',
                     'random_fold_in', 'Dropout')
ATTENTION_BLOCK = re.compile(r'^(attn(_\d+)?|AttnBlock(_\d+)?)$')
ATTENTION_NON_CORE = re.compile(r'^(norm\w*|GroupNorm(_\d+)?|q|k|v|proj_out|NIN(_\d+)?|Dense(_\d+)?)$')
NORM_COMPONENT = re.compile(r'^(norm\w*|GroupNorm(_\d+)?|LayerNorm(_\d+)?)$')
STATE_UPDATE_SOURCE = re.compile(r'\b(ema\w*|optax|optimizer|apply_updates|opt_state)\b')
# Library kernel names -> category, for kernels that carry no usable hlo_op (inside a command buffer).
KERNEL_PATTERNS = ((re.compile(r'wgrad', re.I), CONV_BACKWARD_FILTER),
                   (re.compile(r'dgrad', re.I), CONV_BACKWARD_DATA),
                   (re.compile(r'fprop|convolve|conv2d|implicit_gemm', re.I), CONV_FORWARD),
                   (re.compile(r'fmha|flash|sdpa', re.I), ATTENTION),
                   (re.compile(r'gemm|nvjet|cutlass|cublas|matmul|xmma', re.I), GEMM),
                   (re.compile(r'^(memcpy|memset)|copy|transpose', re.I), DATA_MOVEMENT))


# ------------------------------------------------------------------------------------------- HLO text

@dataclasses.dataclass(frozen=True)
class Frame:
    """The innermost Python stack frame of an instruction's metadata."""
    file: str
    function: str
    line: int


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction of `compiled.as_text()`.

    shape: the result type as printed ('f32[8,8,8,32]{3,2,1,0}' or a tuple); operands: operand names;
    called: computations it calls (fusion body, loop body/condition, call target, branches); attributes:
    the raw 'key=value' text after the operands (window, dim_labels, custom_call_target, backend_config...).
    """
    name: str
    opcode: str
    computation: str
    shape: str
    operands: tuple
    called: tuple
    attributes: str
    op_name: str = ''
    frame: Optional[Frame] = None

    @property
    def custom_call_target(self) -> str:
        match = re.search(r'custom_call_target="([^"]*)"', self.attributes)
        return match.group(1) if match else ''

    @property
    def fusion_kind(self) -> str:
        match = re.search(r'\bkind=(k\w+)', self.attributes)
        return match.group(1) if match else ''


@dataclasses.dataclass
class HloModule:
    """Parsed `compiled.as_text()`: module name, instructions by name, instruction names per computation."""
    name: str
    instructions: dict
    computations: dict

    def fused(self, instruction: Instruction) -> list:
        """The instruction itself, or for a fusion every instruction it fuses (nested fusions included)."""
        if instruction.opcode != 'fusion':
            return [instruction]
        found = []
        for computation in instruction.called:
            for name in self.computations.get(computation, ()):
                found.extend(self.fused(self.instructions[name]))
        return found


_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$')
_OPCODE = re.compile(r'(?:^|[\s)}\]])(?P<opcode>[a-z][a-z0-9\-_]*)\(')
_CALLED = re.compile(r'\b(?:calls|to_apply|body|condition|branch_computations|called_computations)='
                     r'(\{[^}]*\}|%?[\w.\-]+)')


def _matching_paren(text: str, start: int) -> int:
    """Index of the ')' closing the '(' at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {'(': 1, ')': -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f'unbalanced parentheses in HLO line: {text[:200]!r}')


def _operand_names(text: str) -> tuple:
    """'f32[8]{0} %a, %b.1' or 'a, b.1' -> ('a', 'b.1'): the last word of each top-level comma-separated item."""
    items, depth, current = [], 0, ''
    for char in text:
        depth += 1 if char in '([{' else -1 if char in ')]}' else 0
        if char == ',' and depth == 0:
            items.append(current)
            current = ''
        else:
            current += char
    items.append(current)
    return tuple(item.split()[-1].lstrip('%') for item in items if item.split())


def _parse_tables(lines: list) -> dict:
    """The 'FileNames', 'FunctionNames', 'FileLocations', 'StackFrames' tables before the computations:
    {table: {id: text}} (ids as printed)."""
    tables, current = {}, None
    for line in lines:
        if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
            current = tables.setdefault(line, {})
        elif current is not None and re.match(r'^\d+ ', line):
            key, value = line.split(' ', 1)
            current[int(key)] = value.strip().strip('"')
        elif current is not None:
            current = None
    return tables


def _frame(tables: dict, metadata: str) -> Optional[Frame]:
    """The instruction's innermost frame: metadata source_file/source_line, or its stack_frame_id's location."""
    file_match = re.search(r'source_file="([^"]*)"', metadata)
    line_match = re.search(r'source_line=(\d+)', metadata)
    if file_match:
        return Frame(file_match.group(1), '', int(line_match.group(1)) if line_match else 0)
    frame_match = re.search(r'stack_frame_id=(\d+)', metadata)
    if not frame_match or int(frame_match.group(1)) not in tables.get('StackFrames', {}):
        return None
    frame = dict(re.findall(r'(\w+)=(\d+)', tables['StackFrames'][int(frame_match.group(1))]))
    location = dict(re.findall(r'(\w+)=(\d+)', tables.get('FileLocations', {}).get(
        int(frame.get('file_location_id', -1)), '')))
    if not location:
        return None
    return Frame(tables.get('FileNames', {}).get(int(location.get('file_name_id', -1)), ''),
                 tables.get('FunctionNames', {}).get(int(location.get('function_name_id', -1)), ''),
                 int(location.get('line', 0)))


def parse_hlo(text: str) -> HloModule:
    """Parses the text of an (optimized) HLO module: every computation's instructions, with their opcode,
    result shape, operands, called computations, attributes, op_name and innermost source frame."""
    lines = text.splitlines()
    header = re.match(r'^HloModule\s+([\w.\-]+)', lines[0]) if lines else None
    if header is None:
        raise ValueError(f'not an HLO module text (first line {lines[0][:80] if lines else ""!r})')
    tables = _parse_tables(lines)
    instructions, computations, computation = {}, {}, None
    for line in lines[1:]:
        if computation is None:
            match = _COMPUTATION.match(line)
            if match and not line.startswith(' '):
                computation = match.group('name')
                computations[computation] = []
            continue
        if line.startswith('}'):
            computation = None
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        rest = match.group('rest')
        opcode = _OPCODE.search(rest)
        if opcode is None:
            continue
        close = _matching_paren(rest, opcode.end() - 1)
        operands = _operand_names(rest[opcode.end():close])
        attributes = rest[close + 1:]
        metadata = re.search(r'metadata=\{([^}]*)\}', attributes)
        metadata = metadata.group(1) if metadata else ''
        op_name = re.search(r'op_name="([^"]*)"', metadata)
        called = []
        for group in _CALLED.findall(attributes):
            called.extend(name.strip().lstrip('%') for name in group.strip('{}').split(',') if name.strip())
        name = match.group('name')
        instructions[name] = Instruction(
            name=name, opcode=opcode.group('opcode'), computation=computation,
            shape=rest[:opcode.start()].strip(), operands=operands, called=tuple(called), attributes=attributes,
            op_name=op_name.group(1) if op_name else '', frame=_frame(tables, metadata))
        computations[computation].append(name)
    return HloModule(name=header.group(1), instructions=instructions, computations=computations)


# ------------------------------------------------------------------------------------------- classification

def _dims(shape: str) -> list:
    """Dimensions of the first array in a printed shape: 'f32[8,3,3,32]{...}' -> [8, 3, 3, 32]."""
    match = re.search(r'[a-z]\w*\[([\d,]*)\]', shape)
    return [int(d) for d in match.group(1).split(',') if d] if match else []


def _window_size(instruction: Instruction) -> list:
    match = re.search(r'window=\{[^}]*size=([\dx]+)', instruction.attributes)
    return [int(d) for d in match.group(1).split('x')] if match else []


def _dim_labels(instruction: Instruction) -> Optional[tuple]:
    """'b01f_01io->b01f' -> ('b01f', '01io', 'b01f')."""
    match = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', instruction.attributes)
    return match.groups() if match else None


def _operand_dims(module: HloModule, instruction: Instruction, index: int) -> list:
    if index >= len(instruction.operands) or instruction.operands[index] not in module.instructions:
        return []
    return _dims(module.instructions[instruction.operands[index]].shape)


def _is_convolution(instruction: Instruction) -> bool:
    return instruction.opcode == 'convolution' or instruction.custom_call_target.startswith('__cudnn$conv')


def convolution_kind(instruction: Instruction) -> str:
    """CONV_FORWARD / CONV_BACKWARD_DATA / CONV_BACKWARD_FILTER of a convolution or cuDNN conv custom call."""
    target = instruction.custom_call_target
    if 'BackwardFilter' in target:
        return CONV_BACKWARD_FILTER
    if 'BackwardInput' in target:
        return CONV_BACKWARD_DATA
    labels, window = _dim_labels(instruction), _window_size(instruction)
    if labels and window:
        out_dims = _dims(instruction.shape)
        spatial = [out_dims[i] for i, c in enumerate(labels[2]) if c.isdigit() and i < len(out_dims)]
        # A filter gradient convolves the activations with the output gradient: its window is the
        # activation's spatial extent and its output the (smaller) kernel.
        if spatial and np.prod(window) > np.prod(spatial):
            return CONV_BACKWARD_FILTER
    return CONV_BACKWARD_DATA if 'transpose(' in instruction.op_name else CONV_FORWARD


def instruction_flops(module: HloModule, instruction: Instruction) -> float:
    """2 x multiply-adds of the convolutions and dots (cuDNN / cuBLAS custom calls included) that an
    instruction runs (itself, or those it fuses), from the HLO shapes, padding positions included."""
    return sum(_flops(module, part) for part in module.fused(instruction))


def _flops(module: HloModule, instruction: Instruction) -> float:
    if _is_convolution(instruction):
        # An HLO convolution is a forward convolution of its operands. A cuDNN custom call keeps the window and
        # dimension labels of the forward convolution it computes a gradient of: (input, filter) -> output,
        # backward-data (output gradient, filter) -> input gradient, backward-filter (input, output gradient)
        # -> filter gradient; every one costs the forward convolution's multiply-adds.
        labels = _dim_labels(instruction)
        target = instruction.custom_call_target
        if 'BackwardFilter' in target:
            out_dims, filter_dims = _operand_dims(module, instruction, 1), _dims(instruction.shape)
        elif 'BackwardInput' in target:
            out_dims, filter_dims = _operand_dims(module, instruction, 0), _operand_dims(module, instruction, 1)
        else:
            out_dims, filter_dims = _dims(instruction.shape), _operand_dims(module, instruction, 1)
        if not labels or not out_dims or len(filter_dims) != len(labels[1]) or 'i' not in labels[1]:
            return 0.0
        groups = re.search(r'feature_group_count=(\d+)', instruction.attributes)
        window = float(np.prod(_window_size(instruction) or [1]))
        return (2.0 * float(np.prod(out_dims)) * window * filter_dims[labels[1].index('i')]
                / (int(groups.group(1)) if groups else 1))
    if instruction.opcode == 'dot' or any(t in instruction.custom_call_target for t in GEMM_TARGETS):
        lhs = _operand_dims(module, instruction, 0)
        contracting = re.search(r'lhs_contracting_dim(?:s=\{|ensions"?:\s*\[)([^}\]]*)', instruction.attributes)
        if not lhs or not contracting:
            return 0.0
        indices = [int(i.strip().strip('"')) for i in contracting.group(1).split(',') if i.strip()]
        contracted = float(np.prod([lhs[i] for i in indices if i < len(lhs)] or [1]))
        return 2.0 * float(np.prod(_dims(instruction.shape))) * contracted
    return 0.0


def _components(op_name: str) -> list:
    """'jit(f)/transpose(jvp(UNet))/down_0/attn_0/q/dot_general' -> ['jit(f)', 'transpose(jvp(UNet))',
    'down_0', 'attn_0', 'q', 'dot_general'] (several op_names joined by ';' are split too)."""
    return [c for part in op_name.split(';') for c in part.split('/') if c]


def _is_attention_core(op_name: str) -> bool:
    components = _components(op_name)
    for i, component in enumerate(components[:-1]):
        if ATTENTION_BLOCK.match(component):
            return not ATTENTION_NON_CORE.match(components[i + 1])
    return False


def _is_norm_or_activation(op_name: str) -> bool:
    return any(NORM_COMPONENT.match(c) or 'silu' in c or 'swish' in c for c in _components(op_name))


def _is_random(op_name: str) -> bool:
    return any(p in op_name for p in RANDOM_PRIMITIVES)


def _is_state_update(instruction: Instruction) -> bool:
    """Optimizer / EMA: an optax source frame, an op_name scope naming them, or a source line that does."""
    components = [c.lower() for c in _components(instruction.op_name)]
    if any(re.search(r'optax|adam|\bema\b|apply_updates|optimizer', c) for c in components):
        return True
    frame = instruction.frame
    if frame is None:
        return False
    if '/optax/' in frame.file or frame.file.startswith('optax/'):
        return True
    source = linecache.getline(frame.file, frame.line) if frame.line else ''
    return bool(STATE_UPDATE_SOURCE.search(source) or STATE_UPDATE_SOURCE.search(frame.function))


def classify(module: HloModule, instruction: Instruction) -> str:
    """The category of one executed instruction (see the module docstring for the rules and their order)."""
    parts = [i for i in module.fused(instruction) if i.opcode not in STRUCTURAL_OPCODES] or [instruction]
    targets = [p.custom_call_target for p in parts] + [instruction.custom_call_target]
    convolutions = [p for p in parts if _is_convolution(p)]
    if convolutions:
        return convolution_kind(convolutions[0])
    if any('fmha' in t or 'flash' in t for t in targets):
        return ATTENTION
    if any(_is_attention_core(p.op_name) for p in parts):
        return ATTENTION
    if (any(p.opcode == 'dot' for p in parts) or any(any(g in t for g in GEMM_TARGETS) for t in targets)
            or re.search(r'__triton_gemm|__cudnn\$fusion|"kind":"__triton"', instruction.attributes)):
        return GEMM
    if any(_is_state_update(p) for p in parts):
        return OPTIMIZER
    if any(_is_norm_or_activation(p.op_name) for p in parts):
        return NORM_ACTIVATION
    if any(_is_random(p.op_name) or p.opcode == 'rng-bit-generator' for p in parts):
        return RANDOM
    if all(p.opcode in DATA_MOVEMENT_OPCODES for p in parts):
        return DATA_MOVEMENT
    return OTHER


def _sanitized(name: str) -> str:
    """How XLA:GPU names a fusion's kernel after its instruction: 'loop_add_fusion.3' -> 'loop_add_fusion_3'."""
    return re.sub(r'[^A-Za-z0-9_]', '_', name)


# ------------------------------------------------------------------------------------------- trace events

@dataclasses.dataclass(frozen=True)
class Event:
    """One counted device event: where it was, its name, [start, start + duration) in ns, its HLO stats."""
    plane: str
    line: str
    name: str
    start_ns: float
    duration_ns: float
    hlo_op: str
    hlo_module: str


def _stats(event) -> dict:
    stats = {}
    for name, value in event.stats:
        stats.setdefault(name, value)
    return stats


def _device_planes(profile) -> list:
    return [p for p in profile.planes if re.match(r'^/device:(GPU|TPU):\d+$', p.name)]


def collect_events(profile, module: Optional[HloModule] = None) -> tuple:
    """The counted events of a ProfileData-like object (planes -> lines -> events with name, start_ns,
    duration_ns, stats) and a report of what was read and skipped.

    Returns (events [Event], report) with report = dict(source ('device planes' or 'host plane'),
    devices, lines [{plane, line, events, used}], skipped {reason: events}, containers {name: events}).
    `module` (optional) marks the CPU events of while/call/conditional instructions as containers.
    """
    planes = _device_planes(profile)
    on_device = bool(planes)
    if not on_device:
        planes = [p for p in profile.planes if p.name == '/host:CPU']
    if not planes:
        raise ValueError(f'no device or /host:CPU plane in the trace; planes: {[p.name for p in profile.planes]}')
    events, lines_report = [], []
    skipped, containers = collections.Counter(), collections.Counter()
    for plane in planes:
        lines = list(plane.lines)
        stream_lines = [line for line in lines if line.name.startswith('Stream #')]
        if on_device:
            used = stream_lines or [line for line in lines if line.name == 'XLA Ops']
        else:
            used = lines
        for line in lines:
            line_events = list(line.events)
            lines_report.append(dict(plane=plane.name, line=line.name, events=len(line_events),
                                     used=any(line is u for u in used)))
            if not any(line is u for u in used):
                if line_events:
                    skipped[f'line not summed ({line.name.split("/")[0]})'] += len(line_events)
                continue
            candidates = []
            for event in line_events:
                stats = _stats(event)
                if not on_device and 'hlo_op' not in stats:
                    skipped['host runtime event without hlo_op'] += 1
                    continue
                candidates.append(Event(plane.name, line.name, event.name, float(event.start_ns),
                                        float(event.duration_ns), str(stats.get('hlo_op', '')),
                                        str(stats.get('hlo_module', ''))))
            candidates.sort(key=lambda e: (e.start_ns, -e.duration_ns))
            for i, event in enumerate(candidates):
                encloses_next = (i + 1 < len(candidates)
                                 and candidates[i + 1].start_ns < event.start_ns + event.duration_ns)
                instruction = module.instructions.get(event.hlo_op) if module is not None else None
                cpu_container = (not on_device and instruction is not None
                                 and instruction.opcode in CONTAINER_OPCODES)
                if encloses_next or cpu_container:
                    containers[event.hlo_op or event.name] += 1
                else:
                    events.append(event)
    report = dict(source='device planes' if on_device else 'host plane', devices=len(planes), lines=lines_report,
                  skipped=dict(skipped), containers=dict(containers))
    return events, report


def attribute(event: Event, module: HloModule, kernel_names: dict) -> tuple:
    """(category, instruction or None, how) of one counted event; how: 'hlo_op', 'kernel name',
    'kernel name pattern', 'other module' or 'unattributed'."""
    if not event.hlo_op:  # only an exact kernel-name match of one of our instructions attributes it
        instruction = kernel_names.get(event.name)
        if instruction is not None:
            return classify(module, instruction), instruction, 'kernel name'
        return UNATTRIBUTED + event.name[:80], None, 'unattributed'
    if event.hlo_module and event.hlo_module != module.name:
        return OTHER_MODULE + event.hlo_module, None, 'other module'
    instruction = module.instructions.get(event.hlo_op)
    is_transfer = re.match(r'^(memcpy|memset)', event.name, re.I)
    if instruction is not None and (instruction.opcode not in CONTAINER_OPCODES or is_transfer):
        return (DATA_MOVEMENT if is_transfer else classify(module, instruction)), instruction, 'hlo_op'
    # The event carries a container (an XLA command buffer / CUDA graph launch) or an unknown name.
    instruction = kernel_names.get(_sanitized(event.name))
    if instruction is not None:
        return classify(module, instruction), instruction, 'kernel name'
    for pattern, category in KERNEL_PATTERNS:
        if pattern.search(event.name):
            return category, None, 'kernel name pattern'
    return UNATTRIBUTED + event.name[:80], None, 'unattributed'


def _union_ns(events: Iterable[Event]) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, -np.inf
    for event in sorted(events, key=lambda e: e.start_ns):
        stop = event.start_ns + event.duration_ns
        if stop > end:
            total += stop - max(event.start_ns, end)
            end = stop
    return total


def wall_shares_ns(events: list) -> list:
    """Each event's share of the wall time: every instant of the trace split evenly among the events running
    then (so the shares add up to the union of the intervals). On XLA:CPU independent thunks run concurrently on
    the cores, and two convolutions that overlap each take about twice as long: summed durations then
    overstate them, shares do not. `events` of one device."""
    boundaries = sorted({e.start_ns for e in events} | {e.start_ns + e.duration_ns for e in events})
    index = {t: i for i, t in enumerate(boundaries)}
    starts, stops = collections.defaultdict(list), collections.defaultdict(list)
    for i, event in enumerate(events):
        starts[index[event.start_ns]].append(i)
        stops[index[event.start_ns + event.duration_ns]].append(i)
    shares, running = [0.0] * len(events), set()
    for k, t in enumerate(boundaries):
        running.difference_update(stops[k])
        running.update(i for i in starts[k] if events[i].duration_ns > 0)
        if running and k + 1 < len(boundaries):
            share = (boundaries[k + 1] - t) / len(running)
            for i in running:
                shares[i] += share
    return shares


def summarize_events(events: list, report: dict, module: HloModule, *, steps: int, top: int = 15) -> dict:
    """Per-category and per-instruction device time per step (ms) of the counted events.

    Returns dict(kernel_ms_per_step (the sum; categories add up to it), busy_ms_per_step (interval union),
    categories [{category, ms_per_step, wall_share_ms_per_step (`wall_shares_ns` per device; on one device they
    add up to the busy time), percent, events_per_step, gflop_per_step, tflop_s}] (largest first), top_ops [{instruction, category,
    opcode, target, ms_per_step, wall_share_ms_per_step, percent, events_per_step, op_name}],
    events {counted, by_attribution, skipped, containers}).
    """
    kernel_names = {_sanitized(name): instruction for name, instruction in module.instructions.items()}
    per_category = collections.defaultdict(lambda: dict(ns=0.0, share_ns=0.0, events=0, instructions=set()))
    per_instruction = collections.defaultdict(lambda: dict(ns=0.0, share_ns=0.0, events=0))
    by_attribution = collections.Counter()
    scale = 1e-6 / steps / max(1, report['devices'])  # ns summed over the trace -> ms per step per device
    shares = {}
    for plane in {e.plane for e in events}:  # each device's time is shared among its own events only
        on_plane = [e for e in events if e.plane == plane]
        shares.update(zip(map(id, on_plane), wall_shares_ns(on_plane)))
    for event in events:
        share_ns = shares[id(event)]
        category, instruction, how = attribute(event, module, kernel_names)
        by_attribution[how] += 1
        key = instruction.name if instruction is not None else f'[{event.name[:60]}]'
        if instruction is not None:
            per_category[category]['instructions'].add(instruction.name)
        for entry in (per_category[category], per_instruction[(key, category)]):
            entry['ns'] += event.duration_ns
            entry['share_ns'] += share_ns
            entry['events'] += 1
    kernel_ns = sum(entry['ns'] for entry in per_category.values())
    categories = []
    for category, entry in sorted(per_category.items(), key=lambda item: -item[1]['ns']):
        flops = sum(instruction_flops(module, module.instructions[name]) for name in entry['instructions'])
        ms = entry['ns'] * scale
        categories.append(dict(category=category, ms_per_step=ms, wall_share_ms_per_step=entry['share_ns'] * scale,
                               percent=100.0 * entry['ns'] / kernel_ns,
                               events_per_step=entry['events'] / steps / max(1, report['devices']),
                               gflop_per_step=flops / 1e9 if flops else None,
                               tflop_s=flops / (ms / 1e3) / 1e12 if flops and ms > 0 else None))
    top_ops = []
    for (key, category), entry in sorted(per_instruction.items(), key=lambda item: -item[1]['ns'])[:top]:
        instruction = module.instructions.get(key)
        top_ops.append(dict(instruction=key, category=category,
                            opcode=instruction.opcode if instruction else '',
                            target=(instruction.custom_call_target or instruction.fusion_kind) if instruction else '',
                            ms_per_step=entry['ns'] * scale, wall_share_ms_per_step=entry['share_ns'] * scale,
                            percent=100.0 * entry['ns'] / kernel_ns,
                            events_per_step=entry['events'] / steps / max(1, report['devices']),
                            op_name=instruction.op_name if instruction else ''))
    return dict(kernel_ms_per_step=kernel_ns * scale, busy_ms_per_step=_union_ns(events) * scale,
                categories=categories, top_ops=top_ops,
                events=dict(counted=len(events), by_attribution=dict(by_attribution), skipped=report['skipped'],
                            containers=report['containers']),
                source=report['source'], devices=report['devices'], lines=report['lines'])


# ------------------------------------------------------------------------------------------- running

def _trace(trace_dir: str, run) -> str:
    """Runs `run()` under jax.profiler tracing into trace_dir; returns the newest xplane.pb written there."""
    os.makedirs(trace_dir, exist_ok=True)
    jax.profiler.start_trace(trace_dir)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    paths = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f'jax.profiler wrote no *.xplane.pb under {trace_dir}')
    return paths[-1]


def profile_train(base_config, dtype: str, batch_size: int, steps: int, trace_dir: str) -> dict:
    """Compiles and traces the real train step (K = 1); returns dict(compiled, trace_path, wall_s_per_step
    (traced), untraced_wall_s_per_step)."""
    config = bench_train.setting_config(base_config, dtype, batch_size, 1)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    state = jax.block_until_ready(train.create_train_state(config, mesh))
    batches = parallel.shard_batch(bench_train.synthetic_batches(config, 1, batch_size), mesh, batch_axis=1)
    compiled = train.make_train_step(config, mesh).lower(state, batches).compile()
    holder = {'state': state}

    def run_steps() -> list:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            holder['state'], metrics = compiled(holder['state'], batches)
            jax.block_until_ready((holder['state'], metrics))
            times.append(time.perf_counter() - start)
        return times

    for _ in range(2):
        holder['state'], metrics = compiled(holder['state'], batches)
    jax.block_until_ready((holder['state'], metrics))
    untraced = float(np.median(run_steps()))
    traced = []
    path = _trace(trace_dir, lambda: traced.extend(run_steps()))
    return dict(compiled=compiled, trace_path=path, wall_s_per_step=float(np.sum(traced)) / steps,
                untraced_wall_s_per_step=untraced)


def profile_sample(base_config, dtype: str, batch_size: int, steps: int, trace_dir: str) -> dict:
    """Compiles and traces one call of the real sampler with num_steps = steps; same result as profile_train
    (per network evaluation)."""
    config = bench_sample.sampler_config(base_config, dtype, batch_size, steps)
    mesh = parallel.make_mesh()
    parallel.check_global_batch(batch_size, mesh)
    model, shape = unet.create_model(config), params_lib.image_shape(config.data)
    init = jax.jit(lambda rng: params_lib.init_params(model, shape, rng),
                   out_shardings=parallel.replicated_sharding(mesh))
    params = jax.block_until_ready(init(jax.random.key(config.seed)))
    rng = jax.random.key(config.seed + 1)
    sample_batch = sample_mode.make_sample_batch_fn(config, common.model_apply_fn(config), mesh, quantize=False)
    compiled = sample_batch.lower(params, rng).compile()
    jax.block_until_ready(compiled(params, rng))

    def call() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, rng))
        return time.perf_counter() - start

    untraced = call()
    traced = []
    path = _trace(trace_dir, lambda: traced.append(call()))
    return dict(compiled=compiled, trace_path=path, wall_s_per_step=traced[0] / steps,
                untraced_wall_s_per_step=untraced / steps)


def analyse(what: str, run: dict, *, steps: int, batch_size: int) -> dict:
    """Reads the trace of one profile run against its compiled module; returns the JSON section."""
    module = parse_hlo(run['compiled'].as_text())
    profile = jax.profiler.ProfileData.from_file(run['trace_path'])
    events, report = collect_events(profile, module)
    summary = summarize_events(events, report, module, steps=steps)
    wall_ms = 1e3 * run['wall_s_per_step']
    flops = bench_train.compiled_flops(run['compiled'])
    summary.update(
        what=what, module=module.name, batch_size=batch_size, steps=steps, trace_path=run['trace_path'],
        wall_ms_per_step=wall_ms, untraced_wall_ms_per_step=1e3 * run['untraced_wall_s_per_step'],
        busy_fraction=summary['busy_ms_per_step'] / wall_ms if wall_ms > 0 else None,
        xla_gflop_per_step=None if flops is None else flops / 1e9,
        xla_tflop_s_of_kernel_time=(None if flops is None or summary['kernel_ms_per_step'] <= 0
                                    else flops / (summary['kernel_ms_per_step'] / 1e3) / 1e12))
    return summary


# ------------------------------------------------------------------------------------------- report

def _fmt(value, digits=2) -> str:
    return bench_train.fmt_number(value, digits)


def format_profile(section: dict) -> str:
    """Markdown: the category table, busy vs wall, and the top instructions of one profile."""
    unit = 'train step' if section['what'] == 'train' else 'sampling step (network evaluation)'
    out = [f"## {section['what']}: batch {section['batch_size']}, {section['steps']} profiled steps, "
           f"module {section['module']} ({section['source']}, {section['devices']} device(s))", '',
           f'| category | ms / {unit} | wall share, ms | % of kernel time | events / step | GFLOP / step | TFLOP/s |',
           '|---|---|---|---|---|---|---|']
    for c in section['categories']:
        out.append(f"| {c['category']} | {_fmt(c['ms_per_step'], 3)} | {_fmt(c.get('wall_share_ms_per_step'), 1)} | "
                   f"{_fmt(c['percent'], 1)} | "
                   f"{_fmt(c['events_per_step'], 1)} | {_fmt(c['gflop_per_step'], 2)} | {_fmt(c['tflop_s'], 1)} |")
    out.append(f"| **total kernel time** | **{_fmt(section['kernel_ms_per_step'], 3)}** | "
               f"{_fmt(section['busy_ms_per_step'], 1)} (busy) | 100.0 | "
               f"{_fmt(section['events']['counted'] / section['steps'] / max(1, section['devices']), 1)} | "
               f"{_fmt(section['xla_gflop_per_step'], 2)} (XLA) | {_fmt(section['xla_tflop_s_of_kernel_time'], 1)} |")
    out += ['', f"busy (union of event intervals) {_fmt(section['busy_ms_per_step'], 3)} ms / step, wall "
            f"{_fmt(section['wall_ms_per_step'], 3)} ms / step traced ({_fmt(section['untraced_wall_ms_per_step'], 3)}"
            f" untraced): busy fraction {_fmt(section['busy_fraction'], 3)}; events "
            f"{section['events']['by_attribution']}, containers not summed "
            f"{sum(section['events']['containers'].values())}", '',
            '| # | instruction | category | opcode / target | ms / step | wall share, ms | % | events / step | op_name |',
            '|---|---|---|---|---|---|---|---|---|']
    for i, op in enumerate(section['top_ops'], 1):
        opcode = op['opcode'] + (f" {op['target']}" if op['target'] else '')
        out.append(f"| {i} | {op['instruction']} | {op['category']} | {opcode} | {_fmt(op['ms_per_step'], 3)} | "
                   f"{_fmt(op.get('wall_share_ms_per_step'), 1)} | "
                   f"{_fmt(op['percent'], 1)} | {_fmt(op['events_per_step'], 1)} | {op['op_name'][-110:]} |")
    return '\n'.join(out)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='configs/cifar10.py')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='config override, e.g. --set model.attention=cudnn (repeatable)')
    parser.add_argument('--what', default='train,sample', help='comma list of train,sample')
    parser.add_argument('--dtype', default=None, help='float32 or bfloat16 (default: the config)')
    parser.add_argument('--batch_size', type=int, default=None,
                        help='global batch (default: train 128, sample 1024; smoke 8)')
    parser.add_argument('--steps', type=int, default=5,
                        help='profiled steps: train steps, or the sampler\'s num_steps (network evaluations)')
    parser.add_argument('--smoke', action='store_true', help='tiny config (as the benchmarks\' smoke mode)')
    parser.add_argument('--out', default=None, help='JSON result path')
    parser.add_argument('--trace_dir', default=None,
                        help='where the traces go (default: profile_traces/ next to --out, else a temp dir)')
    parser.add_argument('--summarize', nargs='+', default=None, metavar='JSON',
                        help='print the tables of earlier runs\' JSON files and exit')
    args = parser.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            with open(path) as f:
                earlier = json.load(f)
            print(f"# profile {path}: {earlier['device']['device_kind']}, {earlier['dtype']}, "
                  f"settings: {earlier['settings']}")
            for section in earlier['profiles']:
                print(format_profile(section) + '\n')
        return {}

    whats = bench_train.parse_list(args.what, str, 'what', WHATS)
    if args.steps < 1:
        raise ValueError(f'--steps={args.steps} must be positive')
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f'--batch_size={args.batch_size} must be positive')
    overrides = list(args.set)
    if args.smoke:
        overrides = bench_train.smoke_override_words() + overrides
    config, parsed = bench_train.load_config(args.config, overrides)
    dtype = bench_train.parse_list(args.dtype or config.model.dtype, str, 'dtype', bench_train.DTYPES)[0]
    if args.trace_dir:
        trace_dir = args.trace_dir
    elif args.out:
        trace_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), 'profile_traces')
    else:
        trace_dir = tempfile.mkdtemp(prefix='profile_step_')
    xla_flags = os.environ.get('XLA_FLAGS', '')
    result = dict(benchmark='profile', date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  device=bench_train.device_info(), config=args.config, overrides=parsed, set_overrides=list(args.set),
                  xla_flags=xla_flags, settings=bench_train.settings_label(bench_train.parse_overrides(args.set),
                                                                           xla_flags=xla_flags),
                  smoke=args.smoke, dtype=dtype, trace_dir=trace_dir, profiles=[])
    info = result['device']
    print(f"# profile: {info['device_kind']} x{info['device_count']} ({info['platform']}), jax {info['jax_version']}, "
          f"{args.config}{' (smoke)' if args.smoke else ''}, {dtype}, settings: {result['settings']}", flush=True)
    for what in whats:
        batch_size = args.batch_size or (SMOKE_BATCH if args.smoke else DEFAULT_BATCH[what])
        runner = profile_train if what == 'train' else profile_sample
        run = runner(config, dtype, batch_size, args.steps, os.path.join(trace_dir, what))
        section = analyse(what, run, steps=args.steps, batch_size=batch_size)
        result['profiles'].append(section)
        print(format_profile(section) + '\n', flush=True)
        if args.out:
            bench_train.write_json(args.out, result)
    return result


if __name__ == '__main__':
    main()
