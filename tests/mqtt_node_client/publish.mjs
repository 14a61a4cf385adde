// Publish one message as an independent client: a Sparkplug B payload encoded by the Eclipse Tahu
// encoder (npm sparkplug-payload) or a plain text.
// usage: node publish.mjs <broker url> <topic> <json> [--text] [--retain]
//   Sparkplug: <json> is a Tahu payload object, e.g.
//   '{"timestamp": 1, "metrics": [{"name": "Node Control/Rebirth", "type": "Boolean", "value": true}]}'
import mqtt from "mqtt";
import sparkplug from "sparkplug-payload";

const { encodePayload } = sparkplug.get("spBv1.0");
const [url, topic, body, ...flags] = process.argv.slice(2);
const payload = flags.includes("--text") ? body : encodePayload(JSON.parse(body));
const client = mqtt.connect(url, { protocolVersion: 5 });
client.on("connect", () => {
  client.publish(topic, payload, { qos: 1, retain: flags.includes("--retain") }, (err) => {
    if (err) { console.error(String(err)); process.exit(2); }
    client.end(false, () => process.exit(0));
  });
});
client.on("error", (e) => { console.error(String(e)); process.exit(2); });
