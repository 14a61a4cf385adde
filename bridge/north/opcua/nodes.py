"""Building an OPC UA address space fast, straight into asyncua's node store.

asyncua's AddNodes path checks every item and scans the parent's references for
duplicates on each insertion, which makes a panel-scale tree (tens of thousands
of nodes) take tens of seconds. Our tree is generated, so its names are unique
by construction: this builder creates the node records directly and shares the
immutable attribute values between nodes, which also saves most of the memory.

``NodeBuilder.remove`` takes subtrees out again (a reload that removes or changes meters and
segments), and hands back the clients' data-change subscriptions that watched them, detached, so
they can be re-attached to a node of the same NodeId built anew (``reattach``) or told the node is
gone. asyncua's DeleteNodes path scans every node of the address space per deleted node.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

A = ua.AttributeIds
_HAS_COMPONENT = HAS_COMPONENT = ua.NodeId(ua.ObjectIds.HasComponent)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
_ORGANIZES = ua.NodeId(ua.ObjectIds.Organizes)
_HAS_TYPE = ua.NodeId(ua.ObjectIds.HasTypeDefinition)
# the references along which a subtree is removed (the ones the builder creates between our nodes)
_HIERARCHICAL = frozenset((_HAS_COMPONENT, _HAS_PROPERTY, _ORGANIZES))

FOLDER_TYPE = ua.NodeId(ua.ObjectIds.FolderType)
BASE_OBJECT_TYPE = ua.NodeId(ua.ObjectIds.BaseObjectType)
ANALOG_ITEM_TYPE = ua.NodeId(ua.ObjectIds.AnalogItemType)
BASE_DATA_VARIABLE_TYPE = ua.NodeId(ua.ObjectIds.BaseDataVariableType)
PROPERTY_TYPE = ua.NodeId(ua.ObjectIds.PropertyType)

_TYPE_NAMES = {
    FOLDER_TYPE: "FolderType",
    BASE_OBJECT_TYPE: "BaseObjectType",
    ANALOG_ITEM_TYPE: "AnalogItemType",
    BASE_DATA_VARIABLE_TYPE: "BaseDataVariableType",
    PROPERTY_TYPE: "PropertyType",
}


def _const(value, vtype: ua.VariantType) -> AttributeValue:
    return AttributeValue(ua.DataValue(ua.Variant(value, vtype)))


class NodeBuilder:
    """Adds objects, variables and properties under existing nodes. Not for concurrent use."""

    def __init__(self, aspace: AddressSpace, namespace_index: int):
        self.aspace = aspace
        self.ns = namespace_index
        # attribute values every node of a kind shares (never written after the build; a client
        # that monitors one of them registers on the shared record, which never fires)
        self._object_class = _const(ua.NodeClass.Object, ua.VariantType.Int32)
        self._variable_class = _const(ua.NodeClass.Variable, ua.VariantType.Int32)
        self._zero32 = _const(0, ua.VariantType.UInt32)
        self._no_events = _const(0, ua.VariantType.Byte)
        self._scalar = _const(-1, ua.VariantType.Int32)
        self._no_dims = AttributeValue(ua.DataValue(ua.Variant([], ua.VariantType.UInt32, is_array=True)))
        self._read_only = _const(ua.AccessLevel.CurrentRead.mask, ua.VariantType.Byte)
        self._sampling = _const(0.0, ua.VariantType.Double)
        self._not_historizing = _const(False, ua.VariantType.Boolean)
        # a variable whose past a client may read with HistoryRead (Part 11), served by a history storage
        self._read_history = _const(ua.AccessLevel.CurrentRead.mask | ua.AccessLevel.HistoryRead.mask,
                                    ua.VariantType.Byte)
        self._historizing = _const(True, ua.VariantType.Boolean)
        self._datatypes: dict[int, AttributeValue] = {}
        self._texts: dict[tuple, AttributeValue] = {}
        self._type_refs: dict[ua.NodeId, ua.ReferenceDescription] = {}

    def nodeid(self, name: str) -> ua.NodeId:
        return ua.NodeId(name, self.ns)

    # ------------------------------------------------------------ public
    def folder(self, parent: ua.NodeId, ident: str, name: str, description: str = "") -> ua.NodeId:
        return self.object(parent, ident, name, description, type_def=FOLDER_TYPE, ref=_ORGANIZES)

    def object(self, parent: ua.NodeId, ident: str, name: str, description: str = "",
               type_def: ua.NodeId = BASE_OBJECT_TYPE, ref: ua.NodeId = _ORGANIZES) -> ua.NodeId:
        nid = self.nodeid(ident)
        node = self._node(nid, name, description, self._object_class)
        node.attributes[A.EventNotifier] = self._no_events
        self._link(parent, node, name, ua.NodeClass.Object, type_def, ref)
        return nid

    def variable(self, parent: ua.NodeId, ident: str, name: str, value: ua.Variant, datatype: int,
                 description: str = "", type_def: ua.NodeId = BASE_DATA_VARIABLE_TYPE,
                 ref: ua.NodeId = _HAS_COMPONENT, status: ua.StatusCode | None = None,
                 browse_ns: int | None = None, history: bool = False) -> NodeData:
        """A read-only variable; returns its record so the caller can update the Value fast. ``history``:
        Historizing, and HistoryRead in its access levels (its history comes from the server's storage)."""
        nid = self.nodeid(ident)
        node = self._node(nid, name, description, self._variable_class, browse_ns)
        at = node.attributes
        # a Variant of its own: the server updates measurement values in place
        own = ua.Variant(value.Value, value.VariantType, is_array=value.is_array)
        at[A.Value] = AttributeValue(ua.DataValue(own, StatusCode=status or ua.StatusCode()))
        at[A.DataType] = self._datatype(datatype)
        at[A.ValueRank] = self._scalar
        at[A.ArrayDimensions] = self._no_dims
        access = self._read_history if history else self._read_only
        at[A.AccessLevel] = access
        at[A.UserAccessLevel] = access
        at[A.MinimumSamplingInterval] = self._sampling
        at[A.Historizing] = self._historizing if history else self._not_historizing
        cls = ua.NodeClass.Variable
        self._link(parent, node, name, cls, type_def, ref)
        return node

    def property(self, parent: ua.NodeId, ident: str, name: str, value: ua.Variant, datatype: int,
                 standard: bool = False) -> NodeData:
        """A property; ``standard`` for one the OPC UA type defines (its BrowseName is in namespace 0)."""
        return self.variable(parent, ident, name, value, datatype, type_def=PROPERTY_TYPE, ref=_HAS_PROPERTY,
                             browse_ns=0 if standard else None)

    def remove(self, *nodeids: ua.NodeId) -> list[Watch]:
        """Remove each node and everything below it (forward HasComponent, HasProperty and Organizes
        references, recursively), and the references other nodes hold to them (a parent's to its
        child). Returns the data-change subscriptions that watched an attribute of a removed node,
        detached from the address space (``reattach`` them to their nodes built anew)."""
        aspace = self.aspace
        doomed: dict[ua.NodeId, NodeData] = {}
        pending = list(nodeids)
        while pending:
            nid = pending.pop()
            if nid in doomed:
                continue
            node = aspace.get(nid)
            if node is None:
                continue
            doomed[nid] = node
            pending.extend(r.NodeId for r in node.references
                           if r.IsForward and r.ReferenceTypeId in _HIERARCHICAL and r.NodeId not in doomed)
        if not doomed:
            return []
        # every node outside the subtrees that a removed node points back to (its parent): one pass
        # over each one's references, however many of its children go
        outside = {r.NodeId for node in doomed.values() for r in node.references
                   if not r.IsForward and r.NodeId not in doomed}
        for nid in outside:
            node = aspace.get(nid)
            if node is not None:
                node.references[:] = [r for r in node.references if r.NodeId not in doomed]
        # subscriptions on removed nodes: detached here, so that deleting them later (or the
        # session's end) finds no handle to a node that is gone, and nothing keeps the node alive
        watches = []
        handles = aspace._handle_to_attribute_map
        for handle, (nid, attr_id) in list(handles.items()):
            node = doomed.get(nid)
            if node is None:
                continue
            del handles[handle]
            attr = node.attributes.get(attr_id)
            callback = attr.datachange_callbacks.pop(handle, None) if attr is not None else None
            if callback is not None:
                watches.append(Watch(nid, attr_id, handle, callback))
        for nid in doomed:
            del aspace[nid]
        return watches

    # ------------------------------------------------------------ internals
    def _node(self, nid: ua.NodeId, name: str, description: str, node_class: AttributeValue,
              browse_ns: int | None = None) -> NodeData:
        if nid in self.aspace:
            raise ValueError(f"OPC UA node {nid.to_string()} already exists")
        node = NodeData(nid)
        at = node.attributes
        at[A.NodeId] = AttributeValue(ua.DataValue(ua.Variant(nid, ua.VariantType.NodeId)))
        # every meter repeats the same names and descriptions: one shared value for each text
        at[A.BrowseName] = self._shared(("browse", name, self.ns if browse_ns is None else browse_ns))
        at[A.NodeClass] = node_class
        at[A.DisplayName] = self._shared(("display", name))
        at[A.Description] = self._shared(("description", description))
        at[A.WriteMask] = self._zero32
        at[A.UserWriteMask] = self._zero32
        self.aspace[nid] = node
        return node

    def _shared(self, key: tuple) -> AttributeValue:
        if key not in self._texts:
            if key[0] == "browse":
                value = ua.Variant(ua.QualifiedName(key[1], key[2]), ua.VariantType.QualifiedName)
            else:
                value = ua.Variant(ua.LocalizedText(key[1]), ua.VariantType.LocalizedText)
            self._texts[key] = AttributeValue(ua.DataValue(value))
        return self._texts[key]

    def _datatype(self, datatype: int) -> AttributeValue:
        if datatype not in self._datatypes:
            self._datatypes[datatype] = _const(ua.NodeId(datatype), ua.VariantType.NodeId)
        return self._datatypes[datatype]

    def _type_ref(self, type_def: ua.NodeId) -> ua.ReferenceDescription:
        if type_def not in self._type_refs:
            kind = ua.NodeClass.ObjectType if type_def in (FOLDER_TYPE, BASE_OBJECT_TYPE) else ua.NodeClass.VariableType
            self._type_refs[type_def] = ua.ReferenceDescription(
                ReferenceTypeId=_HAS_TYPE, IsForward=True, NodeId=type_def,
                BrowseName=ua.QualifiedName(_TYPE_NAMES[type_def], 0),
                DisplayName=ua.LocalizedText(_TYPE_NAMES[type_def]), NodeClass=kind,
            )
        return self._type_refs[type_def]

    def _link(self, parent: ua.NodeId, node: NodeData, name: str, node_class: ua.NodeClass,
              type_def: ua.NodeId, ref: ua.NodeId) -> None:
        parent_node = self.aspace[parent]
        browse = node.attributes[A.BrowseName].value.Value.Value
        display = node.attributes[A.DisplayName].value.Value.Value
        parent_node.references.append(ua.ReferenceDescription(
            ReferenceTypeId=ref, IsForward=True, NodeId=node.nodeid, BrowseName=browse,
            DisplayName=display, NodeClass=node_class, TypeDefinition=type_def,
        ))
        pat = parent_node.attributes
        parent_class = pat[A.NodeClass].value.Value.Value
        parent_type = next((r.NodeId for r in parent_node.references if r.ReferenceTypeId == _HAS_TYPE and r.IsForward),
                           ua.NodeId())
        node.references.append(ua.ReferenceDescription(
            ReferenceTypeId=ref, IsForward=False, NodeId=parent, BrowseName=pat[A.BrowseName].value.Value.Value,
            DisplayName=pat[A.DisplayName].value.Value.Value, NodeClass=parent_class, TypeDefinition=parent_type,
        ))
        node.references.append(self._type_ref(type_def))


@dataclass(frozen=True)
class Watch:
    """A client's data-change subscription (a monitored item) on one attribute of one node."""

    nodeid: ua.NodeId
    attribute: ua.AttributeIds
    handle: int
    callback: Callable  # async (handle, DataValue) -> None, asyncua's MonitoredItemService.datachange_callback


def reattach(aspace: AddressSpace, watches: list[Watch]) -> list[Watch]:
    """Attach each watch to the node now holding its NodeId (built anew after a ``remove``), so the
    client's monitored item keeps receiving data changes; returns the watches whose node is gone."""
    lost = []
    for w in watches:
        node = aspace.get(w.nodeid)
        attr = node.attributes.get(w.attribute) if node is not None else None
        if attr is None:
            lost.append(w)
            continue
        attr.datachange_callbacks[w.handle] = w.callback
        aspace._handle_to_attribute_map[w.handle] = (w.nodeid, w.attribute)
    return lost
