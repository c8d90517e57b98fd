"""What a person sees while training: a live line on a terminal, one line per epoch
in a log file."""

import sys

from kgreedy.base.machine import format_bytes
from kgreedy.base.peak_memory import MB


class Progress:
    """Prints training progress.

    On a terminal the current epoch's line is rewritten in place (stage, epoch, step,
    loss, accuracy, images/s); otherwise only finished epochs and stages are printed,
    one line each, so a log file stays readable.

    Args:
        stream: where to print (default: stdout).
        live: rewrite a live line; default: whether `stream` is a terminal.
    """

    def __init__(self, stream=None, live=None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self._width = 0

    def _print(self, text, final=True):
        if self.live:
            pad = " " * max(self._width - len(text), 0)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        elif final:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text):
        self._print(text)

    def status(self, text):
        """A transient line (a long pass's position): rewritten in place on a
        terminal, not printed otherwise."""
        if self.live:
            self._print(text, final=False)

    def warning(self, text):
        """A warning on stderr (checkpoint fallbacks, stale locks)."""
        if self.live and self._width:
            self._print("", final=True)
        print(f"kgreedy: warning: {text}", file=sys.stderr, flush=True)

    def stage_start(self, stage, num_stages, row, epochs, steps):
        self._print(f"stage {stage}/{num_stages}: output {'x'.join(map(str, row['output_shape']))}"
                    f", {row['trainable_params']:,} trainable and {row['frozen_params']:,} "
                    f"frozen parameters; {epochs} epochs of {steps} steps")

    def step(self, stage, epoch, epochs, step, steps, loss, accuracy, images_per_second,
             module_accuracies=None):
        if self.live:
            modules = ("" if module_accuracies is None
                       else f" (modules {_accuracies(module_accuracies)})")
            self._print(f"  stage {stage} epoch {epoch}/{epochs} step {step}/{steps} "
                        f"loss {loss:.4f} acc {accuracy:.4f}{modules} "
                        f"{images_per_second:,.0f} img/s", final=False)

    def epoch_end(self, record, epochs, steps):
        self._print(f"  stage {record['stage']} epoch {record['epoch']}/{epochs} "
                    f"step {steps}/{steps} loss {record['train_loss']:.4f} "
                    f"acc {record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} "
                    f"acc {record['val_accuracy']:.4f} | lr {record['learning_rate']:.3g} "
                    f"{record['images_per_second']:,.0f} img/s {record['seconds']:.1f}s"
                    f"{peak_text(record)}")
        if record.get("train_module_accuracy") is not None:
            # A decoupled epoch: every module's head, first to last.
            val = record.get("val_module_accuracy")
            self._print(f"    modules 1..{len(record['train_module_accuracy'])}: train acc "
                        f"{_accuracies(record['train_module_accuracy'])}"
                        + ("" if val is None else f" | val acc {_accuracies(val)}"))

    def stage_end(self, entry):
        train = entry["train_accuracy"]
        train = "n/a" if train is None else f"{train:.4f}"
        self._print(f"stage {entry['stage']} done: val acc {entry['val_accuracy']:.4f} "
                    f"train acc {train} in {entry['seconds']:.1f}s{peak_text(entry, ',')}")


def peak_text(figures, lead=""):
    """' peak 1.2 GB GPU 3.4 GB': a record's or stage entry's peak memory (host, then
    GPU when there is one), '' for one without figures (older runs)."""
    host, gpu = figures.get("peak_memory_mb"), figures.get("gpu_peak_memory_mb")
    if host is None and gpu is None:
        return ""
    text = lead + " peak " + ("-" if host is None else format_bytes(host * MB))
    return text + ("" if gpu is None else f" GPU {format_bytes(gpu * MB)}")


def _accuracies(values):
    return " / ".join(f"{v:.3f}" for v in values)
