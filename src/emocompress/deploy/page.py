"""The page ``GET /`` of the HTTP server: type a text, see the label and one bar per emotion.

Self-contained (inline CSS and JavaScript, no fonts or scripts from the network), so it works on a machine
with no internet access; it calls ``POST /v1/predict`` on the server that sent it.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>emocompress</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
  button { font: inherit; padding: .4rem 1.2rem; margin-top: .5rem; }
  #label { font-size: 1.5rem; font-weight: bold; margin: 1rem 0 .5rem; min-height: 2rem; }
  #error { color: #b00020; white-space: pre-wrap; }
  .row { display: flex; align-items: center; gap: .5rem; margin: .25rem 0; }
  .name { width: 7rem; text-align: right; }
  .track { flex: 1; background: #eee; height: 1.1rem; border-radius: 3px; }
  .bar { background: #4a7bd0; height: 100%; border-radius: 3px; }
  .row.top .bar { background: #d0794a; }
  .value { width: 3.5rem; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1>emocompress</h1>
<form id="form">
  <label for="text">Text</label>
  <textarea id="text" rows="3" placeholder="i feel so happy today"></textarea>
  <button id="predict" type="submit">Predict</button>
</form>
<div id="label"></div>
<div id="bars"></div>
<div id="error"></div>
<script>
const form = document.getElementById("form");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const label = document.getElementById("label"), bars = document.getElementById("bars");
  const error = document.getElementById("error");
  error.textContent = "";
  try {
    const response = await fetch("v1/predict", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify({text: document.getElementById("text").value})});
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    const prediction = body.predictions[0];
    if (prediction.error) throw new Error(prediction.error);
    label.textContent = prediction.label;
    bars.replaceChildren(...Object.entries(prediction.probs).map(([name, p]) => {
      const row = document.createElement("div");
      row.className = name === prediction.label ? "row top" : "row";
      row.dataset.label = name;
      row.innerHTML = '<span class="name"></span><span class="track"><div class="bar"></div></span>' +
                      '<span class="value"></span>';
      row.querySelector(".name").textContent = name;
      row.querySelector(".bar").style.width = (100 * p).toFixed(1) + "%";
      row.querySelector(".value").textContent = (100 * p).toFixed(1) + "%";
      return row;
    }));
  } catch (e) {
    label.textContent = "";
    bars.replaceChildren();
    error.textContent = String(e.message || e);
  }
});
</script>
</body>
</html>
"""
