"""Load driver for the example: concurrent GETs through nginx, standard library only.

    python3 load.py --port 8080 --concurrency 16 --requests 400 --stop-after-5xx 20

Prints one JSON line at the end: requests sent, answers by status, the unix time of the first
5xx seen by the client, and the elapsed time. With --stop-after-5xx it returns as soon as that
many 5xx came back, abandoning the requests still in flight.
"""

import argparse
import http.client
import json
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400, help="total requests to send")
    parser.add_argument("--stop-after-5xx", type=int, default=0,
                        help="stop once this many 5xx came back (0: never)")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    args = parser.parse_args()

    lock = threading.Lock()
    state = {"sent": 0, "status": {}, "first_5xx": None, "errors": 0}
    stop = threading.Event()
    start = time.time()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if state["sent"] >= args.requests or time.time() - start > args.max_seconds:
                    stop.set()
                    return
                state["sent"] += 1
            try:
                conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
                conn.request("GET", args.path)
                status = conn.getresponse().status
                conn.close()
            except OSError:
                status = None
            with lock:
                if status is None:
                    state["errors"] += 1
                    continue
                key = str(status)
                state["status"][key] = state["status"].get(key, 0) + 1
                if status >= 500:
                    if state["first_5xx"] is None:
                        state["first_5xx"] = time.time()
                    fives = sum(n for s, n in state["status"].items() if s.startswith("5"))
                    if args.stop_after_5xx and fives >= args.stop_after_5xx:
                        stop.set()

    # Daemon threads: once told to stop, requests still waiting on a dead upstream are abandoned.
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    while not stop.wait(0.05):
        pass
    if not args.stop_after_5xx or not state["first_5xx"]:
        for t in threads:
            t.join()
    with lock:
        state["elapsed_s"] = round(time.time() - start, 3)
        print(json.dumps(state, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
