// Reads a variable's raw history from the bridge with node-opcua, an OPC UA stack independent of asyncua.
//
//   node history.mjs <endpoint> <namespace-uri> <string-identifier> <start ISO> <end ISO> [numValuesPerNode]
//
// Resolves the namespace index from the server's NamespaceArray, sends one HistoryRead with
// ReadRawModifiedDetails (isReadModified false, returnBounds false) for ns=<idx>;s=<identifier>, follows
// continuation points (releasing none), and prints one JSON object on stdout:
//   {"nodeId", "status", "pages", "values": [{"value", "dataType", "status", "sourceTimestamp"}]}
// Exits non-zero on any failure.
import {
  AttributeIds,
  HistoryReadRequest,
  MessageSecurityMode,
  OPCUAClient,
  ReadRawModifiedDetails,
  SecurityPolicy,
  TimestampsToReturn,
  VariableIds,
} from "node-opcua-client";

const [endpoint, namespaceUri, ident, startIso, endIso, numValues] = process.argv.slice(2);
if (!endpoint || !namespaceUri || !ident || !startIso || !endIso) {
  console.error("usage: node history.mjs <endpoint> <namespace-uri> <identifier> <start ISO> <end ISO> [numValuesPerNode]");
  process.exit(2);
}

const iso = (d) => (d instanceof Date && !Number.isNaN(d.getTime()) ? d.toISOString() : null);

const client = OPCUAClient.create({
  applicationName: "modbus-bridge-test-node-client",
  endpointMustExist: false,
  securityMode: MessageSecurityMode.None,
  securityPolicy: SecurityPolicy.None,
  connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
  requestedSessionTimeout: 10000,
});

let exitCode = 0;
try {
  await client.connect(endpoint);
  const session = await client.createSession();
  try {
    const nsArray = await session.read({ nodeId: VariableIds.Server_NamespaceArray, attributeId: AttributeIds.Value });
    const ns = nsArray.value.value.indexOf(namespaceUri);
    if (ns < 0) throw new Error(`namespace ${namespaceUri} not in ${JSON.stringify(nsArray.value.value)}`);
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
    process.stdout.write(JSON.stringify({ nodeId, status, pages, values }) + "\n");
  } finally {
    await session.close();
  }
} catch (err) {
  console.error(err && err.stack ? err.stack : String(err));
  exitCode = 1;
} finally {
  await client.disconnect();
}
process.exit(exitCode);
