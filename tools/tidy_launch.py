"""Runs a launcher (colossalai run, torchrun) and passes its output on as it comes, less what repeats an error
and the launcher's own chatter.

When a process stops on a bad input, every rank that met it says what is wrong in one `error:` line; torchrun then
adds a 30-line traceback of its own and colossalai run the status of every node. Here each `error:` line is passed
on once, and the launchers' own report is held back: it is shown at the end only where the launch failed and no
process said why (a process killed by a signal, say). run_finetuning.sh launches through this unless VERBOSE=1.
  python3 tools/tidy_launch.py torchrun --nproc_per_node 2 vit_train_demo.py ...
"""
import os
import re
import signal
import subprocess
import sys
import threading

# where a launcher's own report begins: torchrun's log lines about stopping the other processes and about the failed
# one; colossalai run's message about a failed node, and the status of each node that it prints after every run
LAUNCHER_REPORT = re.compile(rb"Sending process \d+ closing signal |failed \(exitcode: |^Error: failed to run |"
                             rb"^====== Training on All Nodes")

# what colossalai run says where no GPU is visible as it loads PyTorch's extension builder, with or without the log
# prefix of newer PyTorch ("W1202 22:44:09.664000 1311 torch/utils/cpp_extension.py:140] "): nothing to act on
LAUNCHER_NOISE = re.compile(rb"^(?:[DIWE]\d{4} [\d:.]+ +\d+ \S+\] )?No CUDA runtime is found, using CUDA_HOME=")


class Output:
    """What has been passed on, and what is held back, of the launcher's stdout and stderr."""

    def __init__(self):
        self.lock = threading.Lock()
        self.errors = set()
        self.holding = False
        self.held_back = []  # (stream, text): everything from the start of the launcher's report on
        self.blank = []  # blank lines, passed on only once something follows them

    def pass_on(self, stream, text, whole_line=True):
        is_error = whole_line and text.startswith(b"error: ")
        if whole_line and LAUNCHER_NOISE.match(text):
            return
        with self.lock:
            self.holding = self.holding or (whole_line and LAUNCHER_REPORT.search(text) is not None)
            if self.holding:
                self.held_back += self.blank + [(stream, text)]
                self.blank = []
            elif text == b"\n":
                self.blank.append((stream, text))
            elif not (is_error and text in self.errors):
                if is_error:
                    self.errors.add(text)
                for pending_stream, pending in self.blank + [(stream, text)]:
                    write(pending_stream, pending)
                self.blank = []

    def forward(self, pipe, stream):
        """Passes a pipe on line by line; a progress bar, which redraws itself after each carriage return, at once."""
        line, in_bar = b"", False
        while chunk := os.read(pipe.fileno(), 1 << 16):
            for piece in filter(None, re.split(rb"(?<=[\r\n])", chunk)):
                if in_bar:
                    self.pass_on(stream, piece, whole_line=False)
                else:
                    line += piece
                    if line.endswith((b"\r", b"\n")):
                        self.pass_on(stream, line)
                        line = b""
                in_bar = piece.endswith(b"\r") or (in_bar and not piece.endswith(b"\n"))
        if line:
            self.pass_on(stream, line)


def write(stream, text):
    stream.buffer.write(text)
    stream.flush()


def main():
    launcher = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Ctrl-C reaches the launcher too, which stops its processes: their last words are still passed on
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: launcher.terminate())
    output = Output()
    readers = [threading.Thread(target=output.forward, args=(pipe, stream))
               for pipe, stream in ((launcher.stdout, sys.stdout), (launcher.stderr, sys.stderr))]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    code = launcher.wait()
    if code != 0 and not output.errors:
        for stream, text in output.held_back:
            write(stream, text)
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
