"""Registers, spills and SASS instructions per element of each CUDA kernel (CPU only).

    python bench/sass_stats.py [--arch 90] [--dtypes bfloat16,float,half,double] [--jobs 2]
                               [--root DIR] [--filter REGEX] [--out FILE]

Compiles each ``csrc/cuda/launch_<dtype>.cu`` for one architecture with setup.py's nvcc
flags (read out of setup.py, so they cannot drift) and ``-Xptxas -v``, disassembles the
object with ``cuobjdump -sass`` and, for every kernel instantiation, finds the loops of
its control-flow graph (innermost natural loops of back edges, so an out-of-line block of
a loop -- the rarely taken online rescale -- counts with it). A loop is classified by what it does
with memory:

  read   loads (global or shared), stores nothing: a statistics pass
  write  loads and stores global memory: a gradient-writing pass
  fill   stores without loads (zero or NaN rows)
  copy   asynchronous global -> shared copies (cp.async / bulk copies)

and its elements per iteration are counted from its 16-byte loads (global or shared),
which only the logits come in (target probabilities and class weights, whose rows
are not aligned as the logits', load element by element): for read and write loops
their bytes over the element size -- not the bytes stored, which count twice where a
loop holds both a vector and an element-by-element store path; for fill and copy loops
the bytes stored or copied. Per kernel the table shows the steady-state loops -- of
each kind the loop with the most elements per iteration (the batched loads); of
row-uniform alternatives with as many (e.g. the write loop for another output
alignment: loops with no barrier between them) the longest; a pass in two loops a
barrier apart (the single-read variant's max, then exp-sum over shared memory, unrolled
alike) both, summed -- as static instructions per element (NOPs
excluded; a CALL to a slow path counts one) and MUFU (special-function) operations per
element. Static counts: each instruction of the loop once, whichever branch runs.

No GPU is needed: nvcc (CUDA_HOME, or /usr/local/cuda*) and cuobjdump (PATH, the CUDA
toolkit, or the ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm`` wheels'
site-packages/nvidia/*/bin) suffice.
``--root`` analyses another checkout (e.g. an older commit, via ``git worktree add``).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# launch_<dtype>.cu -> (C++ type, element bytes)
DTYPES = {"bfloat16": ("c10::BFloat16", 2), "half": ("c10::Half", 2), "float": ("float", 4), "double": ("double", 8)}

# The option bits of a kernel's `unsigned kOpts` template argument (csrc/cuda/options.h;
# keep in step with it), for the labels.
FLAGS = {"smoothing": 1, "probs": 2, "weights": 4, "logit_map": 8, "grad": 16}


def find_tool(name: str) -> str:
    candidates = [os.environ.get(name.upper())]
    if shutil.which(name):
        candidates.append(shutil.which(name))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if home:
            candidates.append(os.path.join(home, "bin", name))
    site = os.path.dirname(os.path.dirname(os.__file__))
    candidates += sorted(glob.glob(os.path.join(site, "site-packages", "nvidia", "*", "bin", name)))
    venv_nvidia = os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "*", "bin", name)
    candidates += sorted(glob.glob(venv_nvidia))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            # The development machines' `nvcc` on PATH is a wrapper script: prefer a real toolkit.
            if name == "nvcc" and pathlib.Path(path).read_bytes()[:2] == b"#!":
                continue
            return path
    sys.exit(f"{name} not found: set {name.upper()}=/path/to/{name}")


def setup_nvcc_flags(root: str) -> list[str]:
    """The `nvcc = [...]` list of setup.py's extension()."""
    tree = ast.parse(pathlib.Path(root, "setup.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                and any(isinstance(t, ast.Name) and t.id == "nvcc" for t in node.targets)):
            return [ast.literal_eval(e) for e in node.value.elts]
    sys.exit("setup.py: no `nvcc = [...]` flag list found")


def compile_object(root: str, dtype: str, arch: str, workdir: str) -> tuple[str, str]:
    import torch.utils.cpp_extension as ext  # only for its include paths

    nvcc = find_tool("nvcc")
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")
    obj = os.path.join(workdir, f"launch_{dtype}.o")
    cmd = [nvcc, "-c", os.path.join(root, "csrc", "cuda", f"launch_{dtype}.cu"), "-o", obj, "-DFUSED_CE_WITH_CUDA",
           f"-I{os.path.join(root, 'csrc')}", f"-I{cuda_include}", "-std=c++20", "--compiler-options", "-fPIC",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
    cmd += [f"-I{p}" for p in ext.include_paths()] + setup_nvcc_flags(root)
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"nvcc failed for {dtype}:\n{run.stderr[-4000:]}")
    return obj, run.stderr


@dataclasses.dataclass
class Resources:
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


def parse_ptxas(log: str) -> dict[str, Resources]:
    out: dict[str, Resources] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_$]+)'?", line)
        if m:
            current = out.setdefault(m.group(1), Resources())
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return out


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str
    op: str
    text: str


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> dict[str, list[Instr]]:
    funcs: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = INSTR.search(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4)))
    return funcs


def _branch_target(ins: Instr) -> int | None:
    m = re.search(r"0x([0-9a-f]+)", ins.text)
    return int(m.group(1), 16) if m else None


def natural_loops(code: list[Instr]) -> list[list[Instr]]:
    """The instructions of each innermost natural loop (back edges to one header merged)."""
    if not code:
        return []
    index = {ins.addr: i for i, ins in enumerate(code)}
    leaders = {0}
    for i, ins in enumerate(code):
        if ins.op.startswith(("BRA", "EXIT", "RET", "BRX", "JMP")):
            if i + 1 < len(code):
                leaders.add(i + 1)
            t = _branch_target(ins) if ins.op.startswith(("BRA", "JMP")) else None
            if t is not None and t in index:
                leaders.add(index[t])
    starts = sorted(leaders)
    block_of = {}
    blocks = []
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else len(code)
        blocks.append((s, e))
        for i in range(s, e):
            block_of[i] = b
    succ: list[set[int]] = [set() for _ in blocks]
    for b, (_start, e) in enumerate(blocks):
        last = code[e - 1]
        falls = True
        if last.op.startswith(("BRA", "JMP")):
            t = _branch_target(last)
            if t is not None and t in index:
                succ[b].add(block_of[index[t]])
            falls = bool(last.pred)
        elif last.op.startswith(("EXIT", "RET", "BRX")):
            falls = bool(last.pred) and last.op.startswith("EXIT")
        if falls and e < len(code):
            succ[b].add(block_of[e])
    # Dominators (iterative), over the blocks reachable from the entry.
    pred: list[set[int]] = [set() for _ in blocks]
    reach, stack = {0}, [0]
    while stack:
        b = stack.pop()
        for s in succ[b]:
            pred[s].add(b)
            if s not in reach:
                reach.add(s)
                stack.append(s)
    dom = {b: set(reach) for b in reach}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(reach - {0}):
            ps = [dom[p] for p in pred[b] if p in reach]
            new = set.intersection(*ps) | {b} if ps else {b}
            if new != dom[b]:
                dom[b], changed = new, True
    loops: dict[int, set[int]] = {}
    for b in reach:
        for h in succ[b]:
            if h in dom[b]:  # back edge b -> h
                body = loops.setdefault(h, {h})
                work = [b]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(p for p in pred[x] if p in reach)
    # Innermost loops only: an outer loop (rows of a grid-stride loop) holds another's header.
    inner = [body for h, body in loops.items() if not any(g != h and g in body for g in loops)]
    return [[code[i] for b in sorted(body) for i in range(*blocks[b])] for body in inner]


def _access_bytes(op: str) -> int:
    """Bytes one thread moves with a load/store opcode (LDG.E.128, STG.E.U16, LDS.64, ...)."""
    for width, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in op:
            return size
    return 4


@dataclasses.dataclass
class Loop:
    kind: str
    instructions: int
    mufu: int
    elements: float
    calls: int
    body: list[Instr] = dataclasses.field(repr=False, default_factory=list)

    @property
    def start(self) -> int:
        return min(i.addr for i in self.body)

    @property
    def per_element(self) -> float:
        return self.instructions / self.elements

    @property
    def mufu_per_element(self) -> float:
        return self.mufu / self.elements


def classify(body: list[Instr], elt: int) -> Loop | None:
    ops = [i.op for i in body if i.op != "NOP"]
    # Only 16-byte loads: the row's vectors (and a weight's or probability's beside them);
    # scalar loads in a loop are row-uniform or rare (a bounds-checked column, a spill).
    loads = sum(16 for o in ops if o.startswith(("LDG", "LDS")) and not o.startswith("LDGSTS") and ".128" in o)
    stores = sum(_access_bytes(o) for o in ops if o.startswith("STG"))
    copies = sum(_access_bytes(o) for o in ops if o.startswith(("LDGSTS", "UBLKCP")))
    mufu = sum(o.startswith("MUFU") for o in ops)
    calls = sum(o.startswith("CALL") for o in ops)
    if copies:
        kind, elements = "copy", copies / elt
    elif stores and loads:
        kind, elements = "write", loads / elt
    elif stores:
        kind, elements = "fill", stores / elt
    elif loads:
        kind, elements = "read", loads / elt
    else:
        return None
    return Loop(kind, len(ops), mufu, elements, calls, body)


@dataclasses.dataclass
class Kernel:
    name: str
    label: str
    dtype: str
    res: Resources
    loops: list[Loop]
    barriers: list[int]  # addresses of block and cluster barriers

    def steady(self, kind: str, longest: bool = True) -> list[Loop]:
        """The steady-state loops of a kind: those with the most elements per iteration. Such
        loops between the same two barriers are row-uniform alternatives (another output
        alignment, a folded coefficient): the longest counts; loops a barrier apart are passes
        one after another (the single-read variant's max, then exp-sum): each counts."""
        of_kind = [lp for lp in self.loops if lp.kind == kind and lp.elements >= 1]
        if not of_kind:
            return []
        most = max(lp.elements for lp in of_kind)
        passes: dict[int, Loop] = {}
        for lp in of_kind:
            if lp.elements == most:
                epoch = sum(b < lp.start for b in self.barriers)
                if epoch not in passes or (lp.instructions > passes[epoch].instructions) == longest:
                    passes[epoch] = lp
        return [passes[e] for e in sorted(passes)]


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def short_label(pretty: str, ctype: str) -> str:
    """'forward_kernel<512, smoothing+grad>' for forward_kernel<c10::BFloat16, 512, 17u>."""
    m = re.match(r"(?:void )?fused_ce::cuda::(\w+)<(.*)>\(", pretty)
    if not m:
        return pretty[:80]
    name, args = m.groups()
    args = args.replace(ctype, "").strip(", ")
    parts = []
    for a in re.split(r",\s*", args):
        if re.fullmatch(r"\(?unsigned int\)?\d+u?|\d+u", a):
            opts = int(re.sub(r"\D", "", a.split(")")[-1]))
            parts.append("+".join(f for f, bit in FLAGS.items() if opts & bit) or "one-hot")
        elif a.startswith("(fused_ce::cuda::TargetMode)"):  # before the option bits (commit 35e0af4)
            mode = int(a.split(")")[-1])
            parts.append(("one-hot", "smoothed", "probs")[mode] + " (runtime weights/logit map)")
        elif a in ("true", "false"):
            parts.append("grad" if a == "true" else "stats")
        elif a:
            parts.append(a)
    return f"{name}<{', '.join(parts)}>"


def analyse(obj: str, ptxas_log: str, dtype: str) -> list[Kernel]:
    ctype, elt = DTYPES[dtype]
    cuobjdump = find_tool("cuobjdump")
    # The wheel's cuobjdump runs the nvdisasm beside it (nvidia-cuda-nvdisasm).
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True, env=env).stdout
    funcs = parse_sass(sass)
    resources = parse_ptxas(ptxas_log)
    pretty = demangle(list(funcs))
    kernels = []
    for name, code in funcs.items():
        label = short_label(pretty[name], ctype)
        loops = [lp for body in natural_loops(code) if (lp := classify(body, elt))]
        barriers = [i.addr for i in code if i.op.startswith(("BAR.", "UCGABAR"))]
        kernels.append(Kernel(name, label, dtype, resources.get(name, Resources()), loops, barriers))
    return sorted(kernels, key=lambda k: k.label)


def _fmt(loops: list[Loop]) -> tuple[str, str, str]:
    if not loops:
        return "-", "-", "-"
    per = sum(lp.per_element for lp in loops)
    mufu = sum(lp.mufu_per_element for lp in loops)
    shape = "+".join(f"{lp.instructions}/{lp.elements:g}" + (f" ({lp.calls} call)" if lp.calls else "") for lp in loops)
    return f"{per:.2f}", f"{mufu:.2f}", shape


def table(kernels: list[Kernel]) -> str:
    head = ("dtype", "kernel", "regs", "spill st/ld", "read instr/elt", "read MUFU/elt", "read loop instr/elts",
            "write instr/elt", "write MUFU/elt", "write loop instr/elts")
    rows = []
    for k in kernels:
        r = _fmt(k.steady("read"))
        w = _fmt(k.steady("write"))
        fewest = _fmt(k.steady("write", longest=False))[0]
        if fewest != w[0]:  # row-uniform alternatives: the common one (aligned output, folded) to the longest
            w = (f"{fewest}-{w[0]}", *w[1:])
        rows.append((k.dtype, k.label, str(k.res.registers), f"{k.res.spill_stores}/{k.res.spill_loads}", *r, *w))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90")
    parser.add_argument("--dtypes", default="bfloat16,float,half,double")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", default=ROOT, help="the source tree to compile (default: this checkout)")
    parser.add_argument("--source-label", help="how the header names the source (default: its git commit)")
    parser.add_argument("--filter", default="", help="regex on the kernel label")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--show", metavar="REGEX", help="print the SASS of the steady-state loops of these kernels")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}")
    source = args.source_label
    if not source:
        commit = subprocess.run(["git", "-C", args.root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", args.root, "status", "--short", "--untracked-files=no", "csrc"],
                               capture_output=True, text=True).stdout.strip()
        source = f"commit {commit}" + (" (csrc modified)" if dirty else "")
    with tempfile.TemporaryDirectory() as work:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            built = dict(zip(dtypes, pool.map(lambda d: compile_object(args.root, d, args.arch, work), dtypes)))
        kernels = [k for d in dtypes for k in analyse(*built[d], d) if re.search(args.filter, k.label)]
    # The common path -- class index, no soft-cap, no weights -- of every variant first.
    lean = [k for k in kernels if re.search(r"<(\d+, )?(one-hot|grad)>$", k.label)]
    spilling = [f"{k.dtype} {k.label}" for k in kernels if k.res.spill_stores or k.res.spill_loads]
    text = (f"# bench/sass_stats.py --arch {args.arch} --dtypes {args.dtypes}: sm_{args.arch}, {source}\n"
            "# instr/elt: static SASS instructions per element in the steady-state loop(s) of each kind\n"
            "# (read: statistics; write: gradient; a-b: the shortest to the longest of a loop's row-uniform\n"
            "# alternatives, e.g. folded coefficient and aligned output to neither); loop instr/elts:\n"
            "# instructions / elements of one iteration (the longest alternative)\n"
            "\n## The common path: class index, no soft-cap, no weights (one-hot: statistics only; grad: fused)\n\n"
            + table(lean) + "\n\n"
            f"## Spills: {len(spilling)} of {len(kernels)} kernels\n\n" + "".join(f"- {n}\n" for n in spilling)
            + "\n## Every kernel\n\n" + table(kernels) + "\n")
    print(text, end="")
    if args.show:
        for k in kernels:
            if re.search(args.show, k.label):
                for kind in ("read", "write"):
                    for lp in k.steady(kind):
                        print(f"\n{k.dtype} {k.label}: {kind} loop, {lp.instructions} instructions, "
                              f"{lp.elements:g} elements")
                        print("\n".join(f"  {i.addr:05x} {i.pred:5s} {i.op}{i.text}" for i in lp.body if i.op != "NOP"))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
