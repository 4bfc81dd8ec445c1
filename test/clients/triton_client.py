"""KServe v2 calls through NVIDIA's Triton client (tritonclient), the official client of the
Open Inference Protocol, against an expertmesh gateway; prints what it got as one JSON object.
test/gateway/triton-client.test.ts runs it (scripts/triton-client.sh makes its venv) and checks
the texts against /v1/completions.

Usage: triton_client.py --http HOST:PORT --grpc HOST:PORT --model NAME --prompts JSON_LIST
"""

import argparse
import json
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
        return {**texts(r), "id": body.get("id"), "parameters": body.get("parameters")}

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
        return texts(r)

    got["single"] = infer(prompts[:1])
    got["batch"] = infer(prompts)
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
