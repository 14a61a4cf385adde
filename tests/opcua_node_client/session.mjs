// What the node-opcua test clients share: a session to the bridge (security None), the bridge
// namespace's index read from the server's NamespaceArray, one JSON line of result on stdout,
// and a non-zero exit on any failure.
import { AttributeIds, MessageSecurityMode, OPCUAClient, SecurityPolicy, VariableIds } from "node-opcua-client";

export const iso = (d) => (d instanceof Date && !Number.isNaN(d.getTime()) ? d.toISOString() : null);

// Runs work(session, ns, namespaces), prints what it returns as one JSON line, and exits.
export async function run(endpoint, namespaceUri, work) {
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
      const namespaces = nsArray.value.value;
      const ns = namespaces.indexOf(namespaceUri);
      if (ns < 0) throw new Error(`namespace ${namespaceUri} not in ${JSON.stringify(namespaces)}`);
      process.stdout.write(JSON.stringify(await work(session, ns, namespaces)) + "\n");
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
}
