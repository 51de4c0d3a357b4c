"""The CLI's stdout carries only its own output: Ray's background notices go to stderr."""

import io
import threading

from stalwart.cli import _OwnStdout


def test_ray_threads_write_to_stderr_and_the_command_to_stdout():
    out, err = io.StringIO(), io.StringIO()
    stdout = _OwnStdout(out, err)
    stdout.write('{"state": "RUNNING"}\n')
    # What Ray's error listener prints when a node dies, from its own thread.
    notice = threading.Thread(target=stdout.write, args=("A worker died or was killed ...\n",),
                              name="ray_listen_error_messages")
    notice.start()
    notice.join()
    stdout.flush()
    assert out.getvalue() == '{"state": "RUNNING"}\n'
    assert err.getvalue() == "A worker died or was killed ...\n"
    assert stdout.getvalue() == out.getvalue()  # everything else is the real stdout's
