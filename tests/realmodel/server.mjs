// An Ollama-compatible HTTP server on node-llama-cpp, for the real-model test tier.
//
// It speaks the part of Ollama's API that adapters/ollama.py uses, with Ollama's defaults, so the
// adapter meets a real model without a real Ollama install: GET /, /api/tags, /api/version;
// POST /api/chat (stream true: NDJSON chunks and a final `done` record with done_reason
// "stop"/"length", prompt_eval_count, eval_count; stream false: one record), options temperature
// (default 0.8 as in Ollama), seed, top_k, top_p, min_p, repeat_penalty, stop, num_ctx (default
// 2048), num_predict; `format` "json" or a JSON schema, enforced by a grammar. Errors are Ollama's:
// {"error": ...} with 404 for an unknown model, 400 for a bad request.
//
// One model in memory and one generation at a time (Ollama with NUM_PARALLEL=1): requests queue.
//
// Usage: node server.mjs [--port 0] [--models DIR] [--model NAME=FILE ...] [--threads N]
// Prints `listening on http://127.0.0.1:PORT` on stdout once it accepts connections.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import {getLlama, LlamaChat, LlamaLogLevel} from "node-llama-cpp";

const VERSION = "0.0.0-cli-council-test";

function parseArgs(argv) {
    const a = {port: 0, models: new Map(), threads: 0};
    for (let i = 0; i < argv.length; i++) {
        const k = argv[i], v = argv[i + 1];
        if (k === "--port") a.port = Number(v), i++;
        else if (k === "--threads") a.threads = Number(v), i++;
        else if (k === "--models") {
            for (const f of fs.readdirSync(v).filter((f) => f.endsWith(".gguf")).sort())
                a.models.set(f.slice(0, -".gguf".length), path.resolve(v, f));
            i++;
        } else if (k === "--model") {
            const eq = v.indexOf("=");
            if (eq < 1) throw new Error(`--model wants NAME=FILE, got ${v}`);
            a.models.set(v.slice(0, eq), path.resolve(v.slice(eq + 1)));
            i++;
        } else throw new Error(`unknown argument ${k}`);
    }
    return a;
}

const args = parseArgs(process.argv.slice(2));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});

// Ollama resolves "name" as "name:latest"; the same here.
function lookup(name) {
    if (typeof name !== "string" || !name) return null;
    if (args.models.has(name)) return name;
    if (!name.includes(":") && args.models.has(`${name}:latest`)) return `${name}:latest`;
    if (name.endsWith(":latest") && args.models.has(name.slice(0, -":latest".length)))
        return name.slice(0, -":latest".length);
    return null;
}

const loaded = {name: null, model: null, context: null, ctxSize: 0};

async function contextFor(name, numCtx) {
    let loadMs = 0;
    if (loaded.name !== name) {
        const t0 = Date.now();
        await loaded.context?.dispose();
        await loaded.model?.dispose();
        Object.assign(loaded, {name: null, model: null, context: null, ctxSize: 0});
        loaded.model = await llama.loadModel({modelPath: args.models.get(name)});
        loaded.name = name;
        loadMs = Date.now() - t0;
    }
    const size = Math.max(256, Math.min(numCtx, loaded.model.trainContextSize));
    if (loaded.ctxSize !== size) {
        await loaded.context?.dispose();
        loaded.context = await loaded.model.createContext({contextSize: size, threads: args.threads});
        loaded.ctxSize = size;
    }
    return {context: loaded.context, loadMs};
}

class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
}

function history(messages) {
    if (!Array.isArray(messages)) throw new HttpError(400, "messages must be an array");
    return messages.map((m) => {
        const text = typeof m?.content === "string" ? m.content : "";
        switch (m?.role) {
            case "system": return {type: "system", text};
            case "user": return {type: "user", text};
            case "assistant": return {type: "model", response: [text]};
            default: throw new HttpError(400, `invalid role: ${JSON.stringify(m?.role)}`);
        }
    });
}

async function grammarFor(format) {
    if (format === undefined || format === null || format === "") return undefined;
    if (format === "json") return llama.getGrammarFor("json");
    if (typeof format === "object") {
        try { return await llama.createGrammarForJsonSchema(format); }
        catch (e) { throw new HttpError(400, `invalid JSON schema in format: ${e.message}`); }
    }
    throw new HttpError(400, `invalid format: ${JSON.stringify(format)}`);
}

function num(options, key, fallback) {
    const v = options[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== "number" || !Number.isFinite(v)) throw new HttpError(400, `option ${key} must be a number`);
    return v;
}

// One chat completion: calls onChunk(text) while generating, returns the `done` record's fields.
async function chat(body, onChunk, signal) {
    const name = lookup(body.model);
    if (!body.model) throw new HttpError(400, "model is required");
    if (!name) throw new HttpError(404, `model "${body.model}" not found, try pulling it first`);
    const options = body.options ?? {};
    if (typeof options !== "object") throw new HttpError(400, "options must be an object");
    const chatHistory = history(body.messages ?? []);
    const grammar = await grammarFor(body.format);
    const t0 = Date.now();
    const {context, loadMs} = await contextFor(name, num(options, "num_ctx", 2048));
    const sequence = context.getSequence();
    const limit = new AbortController();
    const stop = () => limit.abort();
    signal.addEventListener("abort", stop);
    const predict = num(options, "num_predict", -1);
    const temperature = num(options, "temperature", 0.8);
    const seed = num(options, "seed", Math.floor(Math.random() * 2 ** 31));
    const stopWords = Array.isArray(options.stop) ? options.stop.filter((s) => typeof s === "string" && s) : [];
    const repeat = num(options, "repeat_penalty", 0);
    const meter = {in: sequence.tokenMeter.usedInputTokens, out: sequence.tokenMeter.usedOutputTokens};
    let evalStart = 0, hitContext = false;
    const llamaChat = new LlamaChat({contextSequence: sequence, autoDisposeSequence: false});
    try {
        const res = await llamaChat.generateResponse(chatHistory, {
            temperature, seed,
            topK: num(options, "top_k", 40), topP: num(options, "top_p", 0.9), minP: num(options, "min_p", 0),
            maxTokens: predict > 0 ? predict : undefined,
            repeatPenalty: repeat > 0 ? {penalty: repeat, lastTokens: num(options, "repeat_last_n", 64)} : false,
            customStopTriggers: stopWords.length ? stopWords : undefined,
            grammar,
            signal: limit.signal, stopOnAbortSignal: true,
            // Ollama ends a reply that fills the window with done_reason "length" rather than
            // shifting the context; so does this server.
            onToken: () => {
                evalStart ||= Date.now();
                if (sequence.nextTokenIndex >= context.contextSize - 1) { hitContext = true; limit.abort(); }
            },
            onTextChunk: (text) => { if (text) onChunk(text); },
        });
        if (signal.aborted) return null;
        const reason = res.metadata.stopReason;
        const now = Date.now();
        return {
            done_reason: reason === "maxTokens" || hitContext ? "length" : "stop",
            total_duration: (now - t0) * 1e6, load_duration: loadMs * 1e6,
            prompt_eval_count: sequence.tokenMeter.usedInputTokens - meter.in,
            prompt_eval_duration: ((evalStart || now) - t0 - loadMs) * 1e6,
            eval_count: sequence.tokenMeter.usedOutputTokens - meter.out,
            eval_duration: (now - (evalStart || now)) * 1e6,
        };
    } finally {
        signal.removeEventListener("abort", stop);
        llamaChat.dispose({disposeSequence: false});
        sequence.dispose();
    }
}

let queue = Promise.resolve();
function serialized(fn) {
    const run = queue.then(fn, fn);
    queue = run.catch(() => {});
    return run;
}

function send(res, status, obj) {
    const data = JSON.stringify(obj);
    res.writeHead(status, {"Content-Type": "application/json; charset=utf-8", "Content-Length": Buffer.byteLength(data)});
    res.end(data);
}

function readBody(req) {
    return new Promise((resolve, reject) => {
        const parts = [];
        req.on("data", (c) => parts.push(c));
        req.on("end", () => resolve(Buffer.concat(parts).toString("utf8")));
        req.on("error", reject);
    });
}

function tags() {
    return {models: [...args.models].map(([name, file]) => {
        const st = fs.statSync(file, {throwIfNoEntry: false});
        return {name, model: name, modified_at: st ? st.mtime.toISOString() : null, size: st?.size ?? 0,
                digest: "", details: {format: "gguf", family: "", parameter_size: "", quantization_level: ""}};
    })};
}

async function handleChat(req, res) {
    let body;
    try { body = JSON.parse(await readBody(req)); }
    catch (e) { return send(res, 400, {error: `invalid JSON body: ${e.message}`}); }
    if (!body || typeof body !== "object") return send(res, 400, {error: "the body must be a JSON object"});
    const stream = body.stream !== false;
    const gone = new AbortController();
    res.on("close", () => { if (!res.writableFinished) gone.abort(); });
    const base = () => ({model: body.model, created_at: new Date().toISOString()});
    let started = false, content = "";
    const onChunk = (text) => {
        if (!stream) { content += text; return; }
        if (!started) { res.writeHead(200, {"Content-Type": "application/x-ndjson"}); started = true; }
        res.write(JSON.stringify({...base(), message: {role: "assistant", content: text}, done: false}) + "\n");
    };
    try {
        const done = await serialized(() => gone.signal.aborted ? null : chat(body, onChunk, gone.signal));
        if (!done) return;
        const last = {...base(), message: {role: "assistant", content: stream ? "" : content}, done: true, ...done};
        if (!stream) return send(res, 200, last);
        if (!started) res.writeHead(200, {"Content-Type": "application/x-ndjson"});
        res.end(JSON.stringify(last) + "\n");
    } catch (e) {
        const status = e instanceof HttpError ? e.status : 500;
        if (status === 500) console.error(e);
        // Like Ollama: once a stream has started, a failure arrives as an {"error"} line with HTTP 200.
        if (started) res.end(JSON.stringify({error: e.message}) + "\n");
        else send(res, status, {error: e.message});
    }
}

const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://x");
    try {
        if ((req.method === "GET" || req.method === "HEAD") && url.pathname === "/") {
            res.writeHead(200, {"Content-Type": "text/plain; charset=utf-8"});
            return res.end("Ollama is running");
        }
        if (req.method === "GET" && url.pathname === "/api/tags") return send(res, 200, tags());
        if (req.method === "GET" && url.pathname === "/api/version") return send(res, 200, {version: VERSION});
        if (req.method === "POST" && url.pathname === "/api/chat") return await handleChat(req, res);
        send(res, 404, {error: "404 page not found"});
    } catch (e) {
        console.error(e);
        if (!res.headersSent) send(res, 500, {error: String(e?.message ?? e)});
        else res.end();
    }
});

for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => { server.close(); process.exit(0); });
server.listen(args.port, "127.0.0.1", () => {
    console.log(`listening on http://127.0.0.1:${server.address().port}`);
});
