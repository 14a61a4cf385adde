// Reads a variable's raw history from the bridge with node-opcua, an OPC UA stack independent of asyncua.
//
//   node history.mjs <endpoint> <namespace-uri> <string-identifier> <start ISO> <end ISO> [numValuesPerNode]
//
// Resolves the namespace index from the server's NamespaceArray, sends one HistoryRead with
// ReadRawModifiedDetails (isReadModified false, returnBounds false) for ns=<idx>;s=<identifier>, follows
// continuation points (releasing none), and prints one JSON object on stdout:
//   {"nodeId", "status", "pages", "values": [{"value", "dataType", "status", "sourceTimestamp"}]}
// Exits non-zero on any failure.
import { HistoryReadRequest, ReadRawModifiedDetails, TimestampsToReturn } from "node-opcua-client";
import { iso, run } from "./session.mjs";

const [endpoint, namespaceUri, ident, startIso, endIso, numValues] = process.argv.slice(2);
if (!endpoint || !namespaceUri || !ident || !startIso || !endIso) {
  console.error("usage: node history.mjs <endpoint> <namespace-uri> <identifier> <start ISO> <end ISO> [numValuesPerNode]");
  process.exit(2);
}

await run(endpoint, namespaceUri, async (session, ns) => {
  const nodeId = `ns=${ns};s=${ident}`;
  const details = new ReadRawModifiedDetails({
    isReadModified: false,
    startTime: new Date(startIso),
    endTime: new Date(endIso),
    numValuesPerNode: Number(numValues || 0),
    returnBounds: false,
  });
  const values = [];
  let status = null;
  let continuationPoint = null;
  let pages = 0;
  do {
    const response = await session.historyRead(
      new HistoryReadRequest({
        historyReadDetails: details,
        timestampsToReturn: TimestampsToReturn.Both,
        releaseContinuationPoints: false,
        nodesToRead: [{ nodeId, continuationPoint }],
      }),
    );
    const result = response.results[0];
    pages += 1;
    status = result.statusCode.name;
    for (const dv of result.historyData.dataValues || []) {
      values.push({
        value: dv.value.value,
        dataType: dv.value.dataType,
        status: dv.statusCode.name,
        sourceTimestamp: iso(dv.sourceTimestamp),
      });
    }
    continuationPoint = result.continuationPoint && result.continuationPoint.length ? result.continuationPoint : null;
  } while (continuationPoint && pages < 100);
  return { nodeId, status, pages, values };
});
