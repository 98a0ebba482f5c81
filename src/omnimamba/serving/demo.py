"""The web demo: one page, served at / by `omnimamba serve` (and `omnimamba demo`), that talks to the same API a
program would: chat about an uploaded image (answers stream in), and generate a grid of images with a guidance
slider. Plain HTML and JavaScript, no build step, nothing loaded from elsewhere."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>OmniMamba demo</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { padding: 14px 24px; background: #1d2330; color: #fff; }
  header h1 { font-size: 18px; margin: 0; } header span { color: #aab3c5; font-size: 13px; }
  main { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; padding: 18px 24px; }
  section { background: #fff; border-radius: 10px; padding: 16px; box-shadow: 0 1px 3px rgba(0,0,0,.12); }
  h2 { font-size: 16px; margin: 0 0 10px; }
  #preview { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee;
             border-radius: 6px; display: block; margin: 8px 0; }
  #log { min-height: 120px; max-height: 300px; overflow: auto; border: 1px solid #dde1e8; border-radius: 6px;
         padding: 8px; margin: 8px 0; }
  .q { color: #51607a; } .a { margin: 0 0 8px; font-weight: 600; }
  input[type=text] { width: 100%; box-sizing: border-box; padding: 7px; border: 1px solid #c5cbd6; border-radius: 6px; }
  button { margin-top: 8px; padding: 7px 16px; border: 0; border-radius: 6px; background: #3461d1; color: #fff;
           cursor: pointer; } button:disabled { background: #9aa8c7; }
  .row { display: flex; gap: 12px; align-items: center; margin-top: 8px; }
  #grid { display: grid; grid-template-columns: repeat(4, 1fr); gap: 8px; margin-top: 12px; }
  #grid img { width: 100%; image-rendering: pixelated; border-radius: 6px; background: #eee; }
  .err { color: #b3261e; } .muted { color: #6b778c; font-size: 13px; }
</style>
</head>
<body>
<header><h1>OmniMamba <span>one Mamba-2 backbone: answers questions about images, draws images from text</span></h1></header>
<main>
<section id="chat">
  <h2>Ask about an image</h2>
  <input type="file" id="image" accept="image/*">
  <img id="preview" alt="">
  <div id="log"><div class="muted">Choose an image, then ask a question.</div></div>
  <input type="text" id="question" placeholder="how many circles are there?">
  <button id="ask">Ask</button>
</section>
<section id="generate">
  <h2>Generate images</h2>
  <input type="text" id="prompt" value="a red circle">
  <div class="row">
    <label>images <input type="number" id="n" value="4" min="1" max="16" style="width:4em"></label>
    <label>guidance <input type="range" id="guidance" min="1" max="8" step="0.5" value="3"></label>
    <output id="guidance-value">3</output>
    <label>seed <input type="number" id="seed" value="0" min="0" style="width:5em"></label>
  </div>
  <button id="go">Generate</button>
  <div id="status" class="muted"></div>
  <div id="grid"></div>
</section>
</main>
<script>
const $ = (id) => document.getElementById(id);
let imageUrl = null, messages = [];

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { imageUrl = reader.result; $("preview").src = imageUrl; messages = [];
                          $("log").innerHTML = ""; };
  reader.readAsDataURL(file);
});

function say(cls, text) {
  const div = document.createElement("div"); div.className = cls; div.textContent = text;
  $("log").appendChild(div); $("log").scrollTop = $("log").scrollHeight; return div;
}

async function ask() {
  const question = $("question").value.trim();
  if (!imageUrl) { say("err", "Choose an image first."); return; }
  if (!question) return;
  const content = [{type: "text", text: question}];
  if (!messages.length) content.unshift({type: "image_url", image_url: {url: imageUrl}});
  messages.push({role: "user", content});
  say("q", "Q: " + question); $("question").value = "";
  const answer = say("a", ""); $("ask").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages, max_tokens: 64, stream: true})});
    if (!r.ok) { const e = await r.json(); throw new Error(e.error.message); }
    const reader = r.body.getReader(), decoder = new TextDecoder(); let buffer = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\\n\\n"); buffer = events.pop();
      for (const ev of events) {
        const data = ev.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const piece = JSON.parse(data).choices[0].delta.content;
        if (piece) answer.textContent += piece;
      }
    }
    messages.push({role: "assistant", content: answer.textContent});
  } catch (e) { answer.className = "err"; answer.textContent = e.message; messages.pop(); }
  $("ask").disabled = false;
}
$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (e) => { if (e.key === "Enter") ask(); });

$("guidance").addEventListener("input", () => { $("guidance-value").textContent = $("guidance").value; });
$("go").addEventListener("click", async () => {
  $("go").disabled = true; $("status").className = "muted"; $("status").textContent = "generating...";
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/images/generations", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({prompt: $("prompt").value, n: Number($("n").value),
                            guidance: Number($("guidance").value), seed: Number($("seed").value)})});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error.message);
    $("grid").innerHTML = "";
    for (const d of body.data) {
      const img = document.createElement("img"); img.src = "data:image/png;base64," + d.b64_json;
      $("grid").appendChild(img);
    }
    $("status").textContent = `${body.data.length} images in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  } catch (e) { $("status").className = "err"; $("status").textContent = e.message; }
  $("go").disabled = false;
});
</script>
</body>
</html>
"""
