// An independent subscriber: mqtt.js + the Eclipse Tahu Sparkplug B decoder (npm sparkplug-payload).
// usage: node subscribe.mjs <broker url> <topic filter> [<topic filter> ...]
// Prints one JSON line per message: {"topic", "retain", "qos", "payload": <decoded Sparkplug object
// for spBv1.0/ topics (64-bit integers as numbers), else the UTF-8 text>, "received": <ms>};
// prints {"subscribed": true} once the subscriptions are acknowledged.
import mqtt from "mqtt";
import sparkplug from "sparkplug-payload";

const { decodePayload } = sparkplug.get("spBv1.0");
const [url, ...filters] = process.argv.slice(2);
// SUBSCRIBER_ID set: a persistent session (clean: false), so what is published while this client or
// the broker is away is delivered when both are back (QoS 1)
const id = process.env.SUBSCRIBER_ID;
const client = mqtt.connect(url, id
  ? { protocolVersion: 4, clean: false, clientId: id, reconnectPeriod: 200 }
  : { protocolVersion: 5, clean: true, reconnectPeriod: 200 });

function plain(value) {
  if (value === null || value === undefined) return value;
  if (typeof value === "object" && typeof value.toNumber === "function") return value.toNumber();  // Long
  if (value instanceof Uint8Array) return Array.from(value);
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

let subscribed = false;
client.on("connect", () => {
  if (subscribed) return;  // a persistent session keeps its subscriptions across reconnections
  subscribed = true;
  client.subscribe(filters.map((f) => ({ [f]: { qos: 1 } })).reduce((a, b) => ({ ...a, ...b }), {}), (err) => {
    if (err) { console.error(String(err)); process.exit(2); }
    process.stdout.write(JSON.stringify({ subscribed: true }) + "\n");
  });
});
client.on("message", (topic, payload, packet) => {
  let decoded;
  if (topic.startsWith("spBv1.0/") && !topic.startsWith("spBv1.0/STATE/")) {
    try { decoded = plain(decodePayload(payload)); } catch (e) { decoded = { decode_error: String(e) }; }
  } else {
    decoded = payload.toString("utf8");
  }
  process.stdout.write(JSON.stringify({ topic, retain: packet.retain, qos: packet.qos, payload: decoded,
                                        received: Date.now() }) + "\n");
});
client.on("error", (e) => { console.error(String(e)); });
process.on("SIGTERM", () => { client.end(true, () => process.exit(0)); });
