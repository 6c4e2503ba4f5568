#!/usr/bin/env bash
# Everything in README.md after training, end to end, writing what it saw to results/:
# serve the three runs with keys and a request log, call them with curl and client.py, take the
# playground screenshot for docs/10, answer the lab from the request log, then stop the server with SIGTERM.
#   bash examples/expert/serving/run_example.sh      (from the repository root, after the three trainings)
set -euo pipefail
HERE=examples/expert/serving
OUT=$HERE/results
WORK=$(mktemp -d)
mkdir -p "$OUT"
PY=.venv/bin/python
KEY=$(.venv/bin/tunelab keys add "$WORK/keys.json" alice 2>/dev/null)
LIMITED=$(.venv/bin/tunelab keys add "$WORK/keys.json" limited --rate-limit 60/min 2>/dev/null)

.venv/bin/tunelab serve sentiment=runs/serving-sentiment spam=runs/serving-spam assistant=runs/serving-assistant \
  --api-keys "$WORK/keys.json" --log-dir "$WORK/logs" --port 0 > "$WORK/server.out" 2> "$WORK/server.err" &
SERVER=$!
until grep -q '^ready:' "$WORK/server.out"; do
  kill -0 $SERVER 2>/dev/null || { cat "$WORK/server.err"; exit 1; }
  sleep 1
done
URL=$(sed -n 's/.*listening on \(http:[^ ]*\).*/\1/p' "$WORK/server.out")
{
  echo "\$ tunelab serve sentiment=runs/serving-sentiment spam=runs/serving-spam assistant=runs/serving-assistant --api-keys keys.json --log-dir logs"
  sed "s#$URL#http://127.0.0.1:8000#g" "$WORK/server.out"
  echo
  echo '$ curl -s localhost:8000/v1/classify ... {"model": "spam", "input": [...]}'
  curl -s "$URL/v1/classify" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"model": "spam", "input": ["WINNER! Claim your free prize now, text 80082", "running late, see you at 7"]}'
  echo; echo
  echo '$ curl -sN localhost:8000/v1/chat/completions ... {"model": "assistant", "stream": true, ...}'
  curl -sN "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"model": "assistant", "stream": true, "temperature": 0, "max_tokens": 16, "messages": [{"role": "user", "content": "Give me one tip for writing clear emails."}]}'
  echo
  echo '$ .venv/bin/python examples/expert/serving/client.py --key $KEY'
  $PY $HERE/client.py --url "$URL" --key "$KEY"
} > "$OUT/calls.txt"

$PY $HERE/screenshot.py --url "$URL" --key "$KEY"

# Lab 3: 70 requests at once (8 at a time) on a 60/min key
START=$(date +%s.%N)
seq 70 | xargs -P 8 -I{} sh -c "curl -s -o /dev/null -D - '$URL/v1/classify' -H 'Authorization: Bearer $LIMITED' \
  -H 'Content-Type: application/json' -d '{\"model\": \"sentiment\", \"input\": \"fine\"}' | tr -d '\r' \
  | awk 'tolower(\$0) ~ /^http/{s=\$2} tolower(\$0) ~ /^retry-after/{r=\$2} END{print s, r}'" > "$WORK/limited.txt"
echo "$START $(date +%s.%N)" > "$WORK/limited-seconds.txt"
kill -TERM $SERVER
wait $SERVER && echo "server exit status: 0 after SIGTERM" >> "$OUT/calls.txt"

$PY - "$WORK" "$OUT" <<'PYEOF'
import collections, json, statistics, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = [json.loads(line) for line in (work / "logs" / "requests.jsonl").read_text().splitlines()]
by_model = collections.defaultdict(list)
for r in rows:
    if r["status"] == 200 and r["model"]:
        by_model[r["model"]].append(r["latency_ms"])
statuses = collections.Counter(line.split()[0] for line in (work / "limited.txt").read_text().splitlines())
retry = sorted({line.split()[1] for line in (work / "limited.txt").read_text().splitlines() if len(line.split()) > 1})
served = json.loads((work / "logs" / "served.json").read_text())
text = ["# Lab answers (from run_example.sh)", "",
        "2. Median latency_ms of the successful requests, per model, from logs/requests.jsonl:", "",
        "```python", "import collections, json, statistics",
        "rows = [json.loads(l) for l in open('logs/requests.jsonl')]",
        "by = collections.defaultdict(list)",
        "for r in rows:",
        "    if r['status'] == 200 and r['model']: by[r['model']].append(r['latency_ms'])",
        "print({m: statistics.median(v) for m, v in by.items()})", "```", ""]
text += [f"- {m}: {statistics.median(v):.1f} ms over {len(v)} requests" for m, v in sorted(by_model.items())]
start, end = map(float, (work / "limited-seconds.txt").read_text().split())
seconds = end - start
text += ["", f"3. 70 requests, 8 at a time, with a 60/min key took {seconds:.1f} s: status counts "
         + json.dumps(dict(statuses)) + f"; Retry-After on the refused ones: {', '.join(retry) or 'none'} s. The "
         "bucket starts with a minute's worth (60 requests) and refills at one per second, so about "
         f"60 + {seconds:.0f} (the refill while they ran) got through and the rest were refused with 429.",
         "", f"served.json listed: {', '.join(m['name'] + ' (' + m['method'] + ' on ' + m['base_model'] + ')' for m in served['loaded'])}"]
(out / "lab-answers.md").write_text("\n".join(text) + "\n")
print("\n".join(text))
PYEOF
for run in sentiment spam assistant; do
  mkdir -p "$OUT/$run"
  cp runs/serving-$run/metrics.json runs/serving-$run/manifest.json "$OUT/$run/"
done
