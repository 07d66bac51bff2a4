"""Throwaway: the same OnnxPredictor behind LitServe's batching (max_batch_size 32, batch_timeout 5 ms)."""
import sys
import litserve as ls
from emocompress.deploy.serve import OnnxPredictor

folder, port = sys.argv[1], int(sys.argv[2])

class API(ls.LitAPI):
    def setup(self, device):
        self.predictor = OnnxPredictor(folder, batch_size=32)
    def decode_request(self, request):
        return request["text"]
    def batch(self, inputs):
        return list(inputs)
    def predict(self, texts):
        return self.predictor.predict(texts)
    def unbatch(self, output):
        return output
    def encode_response(self, output):
        return {"predictions": [output]}

if __name__ == "__main__":
    server = ls.LitServer(API(max_batch_size=32, batch_timeout=0.005, api_path="/v1/predict"), accelerator="cpu",
                          workers_per_device=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)
