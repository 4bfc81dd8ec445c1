"""KServe v2 calls through NVIDIA's Triton client (tritonclient), the official client of the
Open Inference Protocol, against an expertmesh gateway; prints what it got as one JSON object.
test/gateway/triton-client.test.ts runs it (scripts/triton-client.sh makes its venv) and checks
the texts against /v1/completions.

Usage: triton_client.py --http HOST:PORT --grpc HOST:PORT --model NAME --prompts JSON_LIST
"""

import argparse
import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

GREEDY = {"max_tokens": 6, "temperature": 0}


def texts(result, name="text_output"):
    out = result.as_numpy(name)  # bytes elements from binary data, str from JSON data
    decoded = [e.decode("utf-8") if isinstance(e, bytes) else e for e in out.reshape(-1)]
    return {"shape": list(out.shape), "texts": decoded}


def prompt_array(prompts, shape):
    return np.array([p.encode("utf-8") for p in prompts], dtype=np.object_).reshape(shape)


def http_calls(url, model, prompts):
    c = httpclient.InferenceServerClient(url=url)
    got = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready(model),
        "extensions": c.get_server_metadata()["extensions"],
        "inputs": c.get_model_metadata(model)["inputs"],
    }

    def infer(batch, binary_in=True, binary_out=None, **kw):
        shape = [len(batch), 1]
        i = httpclient.InferInput("text_input", shape, "BYTES")
        i.set_data_from_numpy(prompt_array(batch, shape), binary_data=binary_in)
        outputs = None
        if binary_out is not None:
            outputs = [httpclient.InferRequestedOutput("text_output", binary_data=binary_out)]
        r = c.infer(model, [i], outputs=outputs, parameters=GREEDY, request_id="r1", **kw)
        body = r.get_response()
        # No outputs named: every output comes back, finish_reason too.
        reasons = texts(r, "finish_reason")["texts"] if outputs is None else None
        got = {**texts(r), "id": body.get("id"), "parameters": body.get("parameters")}
        return {**got, "reasons": reasons}

    # The client's defaults: binary input, every output in binary (binary_data_output).
    got["single"] = infer(prompts[:1])
    got["json"] = infer(prompts[:1], binary_in=False, binary_out=False)
    got["batch"] = infer(prompts, binary_out=True)
    got["compressed"] = infer(
        prompts, request_compression_algorithm="gzip", response_compression_algorithm="deflate"
    )
    try:
        c.infer("no-such-model", [httpclient.InferInput("text_input", [1, 1], "BYTES")])
        got["unknown_model"] = None
    except InferenceServerException as e:
        got["unknown_model"] = {"status": e.status(), "message": e.message()}
    c.close()
    return got


def grpc_calls(url, model, prompts):
    c = grpcclient.InferenceServerClient(url=url)
    got = {"live": c.is_server_live(), "model_ready": c.is_model_ready(model)}

    def infer(batch):
        shape = [len(batch), 1]
        i = grpcclient.InferInput("text_input", shape, "BYTES")
        i.set_data_from_numpy(prompt_array(batch, shape))
        r = c.infer(model, [i], parameters=GREEDY)
        return {**texts(r), "reasons": texts(r, "finish_reason")["texts"]}

    got["single"] = infer(prompts[:1])
    got["batch"] = infer(prompts)

    # Streaming (ModelStreamInfer): pieces of each request's text as it is produced; a bad
    # request answered by an error on the callback while the stream goes on.
    events = queue.Queue()
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    for n, prompt in enumerate(prompts[:2]):
        shape = [1, 1]
        i = grpcclient.InferInput("text_input", shape, "BYTES")
        i.set_data_from_numpy(prompt_array([prompt], shape))
        c.async_stream_infer(
            model,
            [i],
            request_id=f"s{n}",
            parameters={**GREEDY, "stream": True},
            enable_empty_final_response=True,
        )
    bad = grpcclient.InferInput("text_input", [1], "BYTES")
    bad.set_data_from_numpy(prompt_array(["x"], [1]))
    c.async_stream_infer("no-such-model", [bad], request_id="bad")
    pieces = {"s0": [], "s1": []}
    done, errors = set(), []
    while len(done) < 2 or not errors:
        result, error = events.get(timeout=60)
        if error is not None:
            errors.append(str(error))
            continue
        r = result.get_response()
        if r.parameters["triton_final_response"].bool_param:
            done.add(r.id)
        if r.outputs:
            pieces[r.id].append(texts(result)["texts"][0])
    c.stop_stream()
    got["stream"] = {
        "texts": ["".join(pieces["s0"]), "".join(pieces["s1"])],
        "pieces": [len(pieces["s0"]), len(pieces["s1"])],
        "errors": errors,
    }
    c.close()
    return got


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--http", required=True)
    p.add_argument("--grpc", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    a = p.parse_args()
    prompts = json.loads(a.prompts)
    json.dump(
        {"http": http_calls(a.http, a.model, prompts), "grpc": grpc_calls(a.grpc, a.model, prompts)},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
