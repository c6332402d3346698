"""Hostile job files for the fuzz tests (tests/faults/test_hostile_input.py) and bench/fuzz.

Every file comes from a seeded ``random.Random``, so a seed reproduces it exactly; the tests draw
(kind, seed) pairs with hypothesis, the bench loops over seeds. Standard library only.

    tree = make_tree(tempfile.mkdtemp())       # an allowed root, a directory outside it, links
    data = hostile_file(random.Random(7), tree, "mutated")
    parse_job(data, "fuzz.toml", tree.context())
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from oddaemon.core.job_validation import ValidationContext
from oddaemon.core.jobspec import ALLOWED_KEYS, CHECKPOINT_TYPES, EVAL_DEVICES, TABLES, WHEN_BEHIND
from oddaemon.core.notifications import EVENTS as NOTIFY_EVENTS

KINDS = ("random_bytes", "token_soup", "toml_doc", "valid_job", "mutated", "deep_nesting", "huge_array",
         "long_values")
MAX_FILE_BYTES = 1_048_576  # the daemon's default max_job_file_bytes


@dataclass(frozen=True)
class Tree:
    """A real allowed root with what a job points at, and ways out of it."""

    root: str      # the allowed root
    outside: str   # a directory next to it, not allowed
    pipeline: str
    checkpoint: str  # a checkpoint prefix (its .index exists)
    label_map: str
    data_glob: str   # matches two files inside the root
    data_file: str
    escape_link: str  # root/link -> outside
    leak_glob: str    # matches root/evil/leak.tfrecord -> outside/secret.config

    def context(self, max_file_bytes: int = MAX_FILE_BYTES) -> ValidationContext:
        return ValidationContext(allowed_roots=(self.root,), max_file_bytes=max_file_bytes,
                                 slurm_partitions=SLURM_PARTITIONS)


def make_tree(base: str) -> Tree:
    root, outside = os.path.join(base, "root"), os.path.join(base, "outside")
    for rel in ("models/m/pipeline.config", "models/m/checkpoint/ckpt-0.index", "data/label_map.pbtxt",
                "data/train-0.tfrecord", "data/train-1.tfrecord", "data/eval.tfrecord"):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("x\n")
    os.makedirs(os.path.join(root, "runs"), exist_ok=True)
    os.makedirs(os.path.join(root, "evil"), exist_ok=True)
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "secret.config"), "w") as f:
        f.write("secret\n")
    for link, target in ((os.path.join(root, "link"), outside),
                         (os.path.join(root, "evil", "leak.tfrecord"), os.path.join(outside, "secret.config"))):
        if not os.path.lexists(link):
            os.symlink(target, link)
    return Tree(root=root, outside=outside, pipeline=f"{root}/models/m/pipeline.config",
                checkpoint=f"{root}/models/m/checkpoint/ckpt-0", label_map=f"{root}/data/label_map.pbtxt",
                data_glob=f"{root}/data/train-*.tfrecord", data_file=f"{root}/data/eval.tfrecord",
                escape_link=f"{root}/link", leak_glob=f"{root}/evil/*.tfrecord")


def hostile_file(rng: random.Random, tree: Tree, kind: str | None = None, max_array: int = 200_000,
                 max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """One job file of ``kind`` (one of KINDS; random when None). ``max_array`` bounds huge arrays."""
    kind = kind or rng.choice(KINDS)
    return _Gen(rng, tree, max_array, max_bytes).make(kind)


SLURM_PARTITIONS = ("train", "gpu-a100")  # what the fuzzed daemon lets jobs choose ([slurm] partitions)


def valid_value(rng: random.Random, tree: Tree, section: str, key: str) -> str | None:
    """A TOML literal the validator accepts for ``key`` of ``section`` ("" = top level); None if there is none."""
    return _Gen(rng, tree, 0, MAX_FILE_BYTES).valid(section, key)


def filename(rng: random.Random) -> str:
    """A spool file name (always a candidate: ends in .toml, no leading dot); its stem may not be a valid job name."""
    stem = rng.choice(["job", "fuzz-1", "a.b_c", "bad name", "x" * rng.randint(60, 240), "日本語", "a..b", "-lead",
                       "tab\there", "new\nline", "q'\"", "%s", "..", "ok"])
    return stem + ".toml"


# ---- text pieces ---------------------------------------------------------------------------------------------

ALPHABETS = ["abcdefghijklmnopqrstuvwxyz", "ABCXYZ0123456789_-.", " \t/\\\"'#=[]{},.*?", "é日本語🙂\u202e\u200b\ufeff",
             "\x00\x01\x1b\x7f\x9f", "\n\r"]
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
TOKENS = ["[", "]", "[[", "]]", "{", "}", "=", ",", ".", '"', "'", '"""', "'''", "#", "\n", "\r\n", " ", "\t", "\\",
          "\\u", "\\U0010FFFF", "\\ud800", "name", "pipeline", "train", "eval", "gpus", "true", "false", "nan", "inf",
          "-inf", "0x", "0o7", "0b2", "1_000", "1979-05-27T07:32:00Z", "07:32", "1e400", "-0.0", "+", "\x00", "\x7f",
          "é", "🙂", "\ufeff", "[pipeline]\n", "[train]\n", "[[eval]]\n", "= [", "= {", "a.b.c"]
BAD_LITERALS = ["007", "0x", "1__0", "1.", ".5", "1e", "0.1_2", "True", "yes", "1979-13-45", "24:61:00",
                "0000-00-00T00:00:00+25:00", "'unterminated", '"\\q"', "[1,", "{a = 1,}", "9" * 5000]
INVALID_UTF8 = [b"\xff", b"\xfe", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\x80"]


def basic_string(text: str, ascii_only: bool = False) -> str:
    """A TOML basic string (JSON escapes are TOML escapes; DEL must be escaped too)."""
    text = json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
    if not ascii_only:
        return text
    return "".join(c if c < "\x7f" else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


class _Gen:
    def __init__(self, rng: random.Random, tree: Tree, max_array: int, max_bytes: int):
        self.rng, self.tree, self.max_array, self.max_bytes = rng, tree, max_array, max_bytes
        self.bad_rate = 0.1  # how often a literal is malformed

    def make(self, kind: str) -> bytes:
        return getattr(self, kind)()

    # -- sizes and text
    def size(self, lo: int, hi: int) -> int:
        """Log-uniform in [lo, hi]: mostly small, sometimes huge."""
        return min(hi, int(lo * (hi / max(lo, 1)) ** self.rng.random()) if lo > 0 else self.rng.randint(0, hi))

    def text(self, hi: int = 20) -> str:
        r = self.rng
        alphabet = "".join(r.sample(ALPHABETS, r.randint(1, 3)))
        return "".join(r.choice(alphabet) for _ in range(r.randint(0, hi)))

    def long_text(self, n: int) -> str:
        chunk = self.text(16) or "a"
        return (chunk * (n // len(chunk) + 1))[:n]

    def string(self, text: str) -> str:
        r = self.rng.random()
        if r < 0.6 or "'" in text or "\n" in text or any(ord(c) < 32 or c == "\x7f" for c in text):
            return basic_string(text, ascii_only=self.rng.random() < 0.3)
        if r < 0.8:
            return f"'{text}'"
        return f'"""{text}"""' if '"' not in text and "\\" not in text else f"'''{text}'''"

    def key(self, key: str) -> str:
        bare = key and all(c in NAME_CHARS.replace(".", "") for c in key)
        return key if bare and self.rng.random() < 0.8 else basic_string(key)

    # -- values
    def scalar(self) -> str:
        """A literal of any TOML type: mostly well-formed, sometimes not (then tomllib rejects the file)."""
        r = self.rng
        if r.random() < self.bad_rate:
            return r.choice(BAD_LITERALS)
        kind = r.randrange(8)
        if kind == 0:
            return str(r.choice([0, 1, -1, 7, 64, 2**31, 2**63 - 1, -2**63, 2**64, r.randint(-10**6, 10**6)]))
        if kind == 1:
            return r.choice(["0xDEAD_beef", "0o755", "0b1010", "1_000", "+5", "-0", "0x" + "f" * r.randint(10, 5000),
                             "9" * r.randint(20, 5000)])
        if kind == 2:
            return r.choice(["3.14", "-0.0", "1e10", "6.02e+23", "inf", "-inf", "nan", "+nan", "1e400", "5e-324",
                             "1e-400", repr(r.uniform(-1e6, 1e6)), "1." + "1" * r.randint(1, 3000)])
        if kind == 3:
            return r.choice(["true", "false"])
        if kind == 4:
            return r.choice(["1979-05-27T07:32:00Z", "1979-05-27 07:32:00.999999-07:00", "1979-05-27T07:32:00",
                             "1979-05-27", "07:32:00"])
        if kind == 5:
            return self.string(self.path())
        return self.string(self.text())

    def value(self, depth: int = 0) -> str:
        r = self.rng.random()
        if depth > 3 or r < 0.7:
            return self.scalar()
        if r < 0.85:
            return "[" + ", ".join(self.value(depth + 1) for _ in range(self.rng.randint(0, 4))) + "]"
        items = (f"{self.key(self.any_key())} = {self.value(depth + 1)}" for _ in range(self.rng.randint(0, 3)))
        return "{" + ", ".join(items) + "}"

    def any_key(self) -> str:
        r = self.rng
        real = r.choice([k for keys in ALLOWED_KEYS.values() for k in keys])
        roll = r.random()
        if roll < 0.6:
            return real
        if roll < 0.8 and len(real) > 2:  # a near miss: the "did you mean" path
            i = r.randrange(len(real) - 1)
            return r.choice([real.replace("_", "-"), real.upper(), real[:i] + real[i + 1] + real[i] + real[i + 2:]])
        return self.text(12)

    def path(self) -> str:
        t, r = self.tree, self.rng
        word = "".join(r.choice(NAME_CHARS[:26]) for _ in range(r.randint(1, 8)))
        return r.choice([
            t.pipeline, t.label_map, t.data_file, t.data_glob, t.checkpoint, t.root, t.root + "/",
            f"{t.root}/runs/{word}",
            f"{t.root}/runs/{word}/deeper/{word}", t.outside, f"{t.outside}/secret.config", "/etc/passwd", "/", "/tmp",
            f"{t.root}/../{os.path.basename(t.outside)}/secret.config", f"{t.root}/runs/../../../etc/passwd",
            f"{t.root}/{'../' * r.randint(1, 40)}etc", f"{t.escape_link}/secret.config", t.escape_link,
            f"{t.escape_link}/{word}", t.leak_glob, f"{t.root}/evil/leak.tfrecord", f"{t.escape_link}/*",
            f"runs/{word}", "", "~/x", " ", f"{t.root}//data///eval.tfrecord", f"{t.root}/data/./eval.tfrecord",
            f"{t.root}/data/eval.tfrecord\x00.config", f"{t.root}/new\nline", f"{t.root}/{'a' * r.randint(200, 5000)}",
            t.root + "/*" * r.randint(1, 3000), f"{t.root}/[", f"{t.root}/data/**", t.checkpoint + ".index",
            f"{t.root}/{'x/' * r.randint(1, 2000)}y"])

    def valid(self, section: str, key: str) -> str | None:
        """A value the validator accepts for ``key`` (None where that depends on other keys)."""
        r, t = self.rng, self.tree
        choices = {
            "name": lambda: basic_string(self.job_name()), "priority": lambda: str(r.randint(-1000, 1000)),
            "after": lambda: "[]",  # (a name would be unknown to the daemon: rejected at submission)
            "pipeline_config": lambda: basic_string(t.pipeline),
            "model_dir": lambda: basic_string(f"{t.root}/runs/{self.job_name()}/{r.randint(0, 10**6)}"),
            "num_classes": lambda: str(r.randint(1, 100_000)), "batch_size": lambda: str(r.randint(1, 64)),
            "num_steps": lambda: str(r.randint(1, 10**6)), "learning_rate_base": lambda: repr(r.uniform(0.01, 1)),
            "warmup_learning_rate": lambda: repr(r.uniform(0, 0.01)), "warmup_steps": lambda: str(r.randint(0, 100)),
            "total_steps": lambda: str(r.randint(100, 10**6)),
            "fine_tune_checkpoint": lambda: basic_string(t.checkpoint),
            "fine_tune_checkpoint_type": lambda: basic_string(r.choice(CHECKPOINT_TYPES)),
            "label_map_path": lambda: basic_string(t.label_map),
            "train_input_path": lambda: r.choice([basic_string(t.data_glob), f"[{basic_string(t.data_file)}]"]),
            "eval_input_path": lambda: basic_string(t.data_file),
            "gpus": lambda: r.choice(['"auto"', "0"]), "checkpoint_every_n": lambda: str(r.randint(1, 10**9)),
            "checkpoint_max_to_keep": lambda: str(r.randint(1, 10_000)),
            "max_restarts": lambda: str(r.randint(0, 1000)),
            "hang_timeout_seconds": lambda: r.choice(["0", "600", "1.5e3"]),
            "oom_retry_halve_batch": lambda: r.choice(["true", "false"]),
            "min_batch_size": lambda: str(r.randint(1, 8)),
            # [train]/[eval] cgroup limits: bytes or a size with a unit (at least 16 MiB), a CPU weight
            "memory_max": lambda: r.choice(['"8G"', '"512M"', str(r.randint(16 << 20, 1 << 40))]),
            "cpu_weight": lambda: str(r.randint(1, 10_000)),
            "enabled": lambda: r.choice(["true", "false"]), "device": lambda: basic_string(r.choice(EVAL_DEVICES)),
            "sample_1_of_n_eval_examples": lambda: str(r.randint(1, 100)),
            "metric": lambda: basic_string(r.choice(["DetectionBoxes_Precision/mAP", "DetectionBoxes_Recall/AR@100"])),
            "higher_is_better": lambda: r.choice(["true", "false"]), "export_best": lambda: r.choice(["true", "false"]),
            "export_when": lambda: r.choice(['"end"', '"each_best"']),
            "max_pinned_bytes": lambda: str(r.randint(1, 10**12)),
            "patience": lambda: str(r.randint(1, 10_000)), "min_delta": lambda: repr(r.uniform(0, 1)),
            "when_behind": lambda: basic_string(r.choice(WHEN_BEHIND)), "max_behind": lambda: str(r.randint(1, 10_000)),
            "time_limit": lambda: r.choice(['"90"', '"12:00:00"', '"2-00:00:00"']),
            "partition": lambda: basic_string(r.choice(SLURM_PARTITIONS)), "nodes": lambda: "1",
            # [notify]: events from the list; targets [] (a name would be unknown to a daemon with none)
            "events": lambda: "[" + ", ".join(f'"{e}"' for e in r.sample(NOTIFY_EVENTS, r.randint(0, 5))) + "]",
            "targets": lambda: "[]", "stalled_after_seconds": lambda: r.choice(["1", "900", "2.5e3"]),
            # [sweep]: each alone (valid_job makes the table coherent: valid_sweep)
            "method": lambda: '"grid"', "values": lambda: "{ num_classes = [1, 2] }",
            "samples": lambda: "1", "seed": lambda: str(r.randint(0, 2**63 - 1)),
            "halving_steps": lambda: "[10, 20]", "keep_fraction": lambda: repr(r.uniform(0.1, 0.9)),
        }
        make = choices.get(key)
        return make() if make else None

    def job_name(self) -> str:
        r = self.rng
        return r.choice(NAME_CHARS[:62]) + "".join(r.choice(NAME_CHARS[:-2] + "-") for _ in range(r.randint(0, 20)))

    # -- documents
    def render(self, doc: dict[str, list[tuple[str, str]]]) -> str:
        """Render {section: [(key, literal)]} ("" = top level) in one consistent random style."""
        style = self.rng.choice(["headers", "dotted", "inline"])
        lines = [f"{self.key(k)} = {v}" for k, v in doc.get("", [])]
        for section in TABLES:
            items = doc.get(section)
            if items is None:
                continue
            if style == "headers":
                lines += [f"\n[{section}]"] + [f"{self.key(k)} = {v}" for k, v in items]
            elif style == "dotted" and items:
                lines += [f"{section}.{self.key(k)} = {v}" for k, v in items]
            else:
                lines.append(f"{section} = {{" + ", ".join(f"{self.key(k)} = {v}" for k, v in items) + "}")
        if self.rng.random() < 0.3:
            comment = "".join(c for c in self.text(30) if c >= " " and c != "\x7f")
            lines.insert(self.rng.randint(0, len(lines)), "# " + comment)
        text = "\n".join(lines) + "\n"
        return text.replace("\n", "\r\n") if self.rng.random() < 0.1 else text

    def valid_job(self) -> bytes:
        """A job every check accepts (each key present at random, cross-checks respected)."""
        r = self.rng
        doc: dict[str, list[tuple[str, str]]] = {}
        for section in ("",) + TABLES:
            keys = [k for k in ALLOWED_KEYS[section] if k not in TABLES and (k in ("pipeline_config", "model_dir")
                                                                             or r.random() < 0.4)]
            doc[section] = [(k, v) for k in keys if k not in ("warmup_steps", "warmup_learning_rate", "batch_size")
                            and (v := self.valid(section, k)) is not None]
        if r.random() < 0.3:
            total = r.randint(100, 10**6)
            doc["pipeline"] += [("total_steps", str(total)), ("warmup_steps", str(r.randint(0, total))),
                                ("learning_rate_base", "0.04"), ("warmup_learning_rate", repr(r.uniform(0, 0.04)))]
            doc["pipeline"] = list(dict(doc["pipeline"]).items())
        if r.random() < 0.3:
            gpus = r.choice([(1, "1"), (2, "[0, 1]"), (0, "0")])
            doc["train"] = [kv for kv in doc["train"] if kv[0] != "gpus"] + [("gpus", gpus[1])]
            doc["pipeline"].append(("batch_size", str(max(gpus[0], 1) * r.randint(1, 16))))
        doc["sweep"] = self.valid_sweep(doc) if doc["sweep"] and r.random() < 0.25 else []  # mostly plain jobs
        for section in TABLES:
            if not doc[section] and r.random() < 0.5:
                del doc[section]
        return self.render(doc).encode()

    def valid_sweep(self, doc: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
        """A [sweep] table the validator accepts with the rest of ``doc``: values over a [pipeline] key
        it leaves out (one no cross-check involves), random or grid, halving when evaluation is on."""
        r, t = self.rng, self.tree
        taken = {k for k, _ in doc["pipeline"]}
        lists = {"num_classes": "[1, 2, 3]", "num_steps": "[10, 20, 30]",
                 "label_map_path": f"[{basic_string(t.label_map)}]",
                 "fine_tune_checkpoint_type": '["detection", "full", "fine_tune"]'}
        free = [k for k in lists if k not in taken]
        if not free:
            return []
        keys = r.sample(free, r.randint(1, len(free)))
        items = [("values", "{ " + ", ".join(f"{k} = {lists[k]}" for k in keys) + " }")]
        if r.random() < 0.5 and any(k != "label_map_path" for k in keys):
            items += [("method", '"random"'), ("samples", "2"), ("seed", str(r.randint(0, 10**9)))]
        elif r.random() < 0.5:
            items.append(("method", '"grid"'))
        if ("enabled", "false") not in doc["eval"] and r.random() < 0.5:
            items += [("halving_steps", "[10, 20]"), ("keep_fraction", repr(r.uniform(0.1, 0.9)))]
        return items

    def base_job(self, skip: str) -> str:
        """The required keys, valid, at the top level (without ``skip``), for a hostile part to follow."""
        lines = [f"{k} = {self.valid('', k)}" for k in ("pipeline_config", "model_dir") if k != skip]
        return "\n".join(lines) + "\n"

    def toml_doc(self) -> bytes:
        """The real key set with values of every TOML type; sometimes valid, often not."""
        r = self.rng
        self.bad_rate = r.choice([0.0, 0.0, 0.0, 0.02])  # most documents get past tomllib to the validator
        doc: dict[str, list[tuple[str, str]]] = {}
        for section in ("",) + TABLES:
            if section and r.random() < 0.3:
                continue
            pool = [k for k in ALLOWED_KEYS[section] if k not in TABLES]
            items = []
            for _ in range(r.randint(0, len(pool) + 2)):
                key = r.choice(pool) if r.random() < 0.8 else self.any_key()
                roll = r.random()
                literal = (self.valid(section, key) if roll < 0.4 else None) or \
                    (self.string(self.path()) if roll < 0.6 else self.value())
                items.append((key, literal))
            doc[section] = list(dict(items).items())  # one value per key: the validator, not tomllib, decides
        text = self.render(doc)
        if r.random() < 0.2:  # a table in the wrong shape, an unknown table or a sub-table
            text += r.choice(["train = 5\n", "[[eval]]\nenabled = true\n", "[trian]\ngpus = 1\n",
                              "[pipeline.sub]\nx = 1\n", "[pipeline]\n[pipeline]\n", "eval = []\n"])
        return text.encode()

    def mutated(self) -> bytes:
        """A valid job with byte flips, truncation, NUL and invalid UTF-8 inserted, lines shuffled."""
        r = self.rng
        data = bytearray(self.valid_job())
        for _ in range(r.randint(1, 5)):
            op, at = r.randrange(8), r.randint(0, len(data))
            if op == 0 and data:
                i = r.randrange(len(data))
                data[i] ^= 1 << r.randrange(8)
            elif op == 1:
                del data[at:]
            elif op == 2:
                data[at:at] = b"\x00" * r.randint(1, 3)
            elif op == 3:
                data[at:at] = r.choice(INVALID_UTF8)
            elif op == 4:
                del data[at:at + r.randint(1, 20)]
            elif op == 5:
                data[at:at] = r.choice(TOKENS).encode()
            elif op == 6:
                lines = bytes(data).split(b"\n")
                r.shuffle(lines)
                data = bytearray(b"\n".join(lines))
            else:
                data[at:at] = b"\xef\xbb\xbf" if r.random() < 0.5 else data[at:at + r.randint(1, 80)]
        return bytes(data)

    def random_bytes(self) -> bytes:
        r = self.rng
        if r.random() < 0.03:  # just over the size cap
            return r.randbytes(self.max_bytes + r.randint(1, 1000))
        return r.randbytes(self.size(1, 4096))

    def token_soup(self) -> bytes:
        r = self.rng
        parts = [r.choice(TOKENS) if r.random() < 0.7 else self.scalar() for _ in range(self.size(1, 300))]
        return "".join(parts).encode("utf-8", "surrogatepass")

    def deep_nesting(self) -> bytes:
        r = self.rng
        n = self.size(10, 5000)
        key = r.choice(["a", "name", "gpus", "train_input_path", "pipeline", "train"])
        forms = [
            f"{key} = " + "[" * n + "]" * n,
            f"{key} = " + "[" * n + "1" + "]" * n,
            f"{key} = " + "{a = " * n + "1" + "}" * n,
            "[" + ".".join([key] * n) + "]\nx = 1\n",
            "[[" + ".".join([key] * n) + "]]\n",
            ".".join([key] * n) + " = 1\n",
            "[pipeline." + ".".join(["a"] * n) + "]\n",
            "[pipeline]\ntrain_input_path = " + "[" * n + basic_string(self.tree.data_file) + "]" * n,
            "[pipeline]\ntrain_input_path = " + basic_string(self.tree.root + "/*" * n),
            "[" * n,  # unterminated
        ]
        return (self.base_job(key) + r.choice(forms) + "\n").encode()

    def huge_array(self) -> bytes:
        r = self.rng
        n = self.size(500, self.max_array)
        element = r.choice([lambda: "1", lambda: basic_string(self.tree.data_file), lambda: self.scalar(),
                            lambda: "[]", lambda: "{}", lambda: basic_string(self.tree.outside)])
        one = element()
        body = ",".join(one for _ in range(n)) if r.random() < 0.7 else ",".join(element() for _ in range(min(n, 5000)))
        where = r.choice(["[pipeline]\ntrain_input_path", "[pipeline]\neval_input_path", "[train]\ngpus",
                          "[eval]\nmetric", "huge", "name"])
        header, _, leaf = where.rpartition("\n")
        return (self.base_job(leaf) + f"{header}\n{leaf} = [{body}]\n").encode()

    def long_values(self) -> bytes:
        r = self.rng
        if r.random() < 0.1:  # over the size cap, as text
            return (self.valid_job().decode() + "# " + "x" * self.max_bytes + "\n").encode()
        n = self.size(1000, self.max_bytes - 4096)
        key = r.choice(["name", "pipeline_config", "model_dir", "[eval]\nmetric", "[pipeline]\ntrain_input_path",
                        "[pipeline]\nnum_steps", "[train]\ncheckpoint_every_n", "priority", "[eval]\nmin_delta",
                        basic_string(self.long_text(min(n, 10_000)))])
        value = r.choice([
            lambda: basic_string(self.long_text(n)), lambda: f"'{'a' * n}'",
            lambda: basic_string(self.tree.root + "/" + "a" * n), lambda: "9" * min(n, 10_000),
            lambda: "0x" + "f" * min(n, 50_000), lambda: "-" + "1" * min(n, 4300), lambda: "1." + "5" * n,
            lambda: "1e" + "9" * min(n, 1000), lambda: "[" + basic_string("x" * n) + "]"])()
        header, _, leaf = key.rpartition("\n")
        return (self.base_job(leaf) + f"{header}\n{leaf} = {value}\n").encode()
