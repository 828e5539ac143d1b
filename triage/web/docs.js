// Starts Swagger UI on the service's own OpenAPI document. Every asset comes from the service:
// no CDN, no font, and no call to Swagger's online validator (validatorUrl null).
// Authorisation typed into the page is not kept in the browser's storage.
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
