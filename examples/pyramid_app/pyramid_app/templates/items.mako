<%inherit file="layout.mako"/>
<%! from datetime import datetime %>
<%! from pyramid_app.models import Item %>
<%def name="title()">Items</%def>

## Cached until any item is inserted, updated or deleted: the key names the table, and
## the items the view loaded, so a commit between that load and this key cannot leave
## their old render under the new key.
<%def name="summary()" cached="True" cache_key="${request.cache_key('summary', Item, items)}">
<p>${len(items)} items: ${", ".join(item.name for item in items)}.
<span class="rendered">rendered at ${datetime.now().strftime("%H:%M:%S.%f")}</span></p>
</%def>

<h1>Items</h1>
${summary()} ${parent.cache_status("summary")}
<ul>
% for item in items:
  <li id="item-${item.id}">
    <%include file="item.mako" args="item=item"/>
    ${parent.cache_status("item-%d" % item.id)}
  </li>
% endfor
</ul>
