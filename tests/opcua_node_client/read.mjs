// Reads meter measurements from the bridge with node-opcua, an OPC UA stack independent of asyncua.
//
//   node read.mjs <endpoint> <namespace-uri> <meter.measurement>...
//
// Resolves the namespace index from the server's NamespaceArray, reads each
// ns=<idx>;s=<meter.measurement> Value and its EngineeringUnits property (found
// by browsing the variable's HasProperty references for that name, in whatever
// namespace), and prints one JSON object on stdout. Exits non-zero on any failure.
import { AttributeIds, BrowseDirection } from "node-opcua-client";
import { iso, run } from "./session.mjs";

const [endpoint, namespaceUri, ...names] = process.argv.slice(2);
if (!endpoint || !namespaceUri || names.length === 0) {
  console.error("usage: node read.mjs <endpoint> <namespace-uri> <meter.measurement>...");
  process.exit(2);
}

await run(endpoint, namespaceUri, async (session, ns, namespaces) => {
  const nodes = names.map((name) => `ns=${ns};s=${name}`);
  const values = await session.read(nodes.map((nodeId) => ({ nodeId, attributeId: AttributeIds.Value })));
  const browsed = await session.browse(
    nodes.map((nodeId) => ({
      nodeId,
      referenceTypeId: "HasProperty",
      browseDirection: BrowseDirection.Forward,
      includeSubtypes: true,
      resultMask: 0x3f,
    })),
  );
  const result = { namespaceIndex: ns, namespaces, values: {} };
  for (let i = 0; i < names.length; i++) {
    const dv = values[i];
    let eu = null;
    const ref = (browsed[i].references || []).find((r) => r.browseName.name === "EngineeringUnits");
    if (ref) {
      const euValue = await session.read({ nodeId: ref.nodeId, attributeId: AttributeIds.Value });
      const info = euValue.value.value;
      eu = info
        ? {
            browseNamespaceIndex: ref.browseName.namespaceIndex,
            namespaceUri: info.namespaceUri,
            unitId: info.unitId,
            displayName: info.displayName && info.displayName.text,
          }
        : null;
    }
    result.values[names[i]] = {
      nodeId: nodes[i],
      value: dv.value.value,
      dataType: dv.value.dataType,
      status: dv.statusCode.name,
      sourceTimestamp: iso(dv.sourceTimestamp),
      serverTimestamp: iso(dv.serverTimestamp),
      engineeringUnits: eu,
    };
  }
  return result;
});
